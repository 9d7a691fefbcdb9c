"""The plugin's dialogs: Train, Predict, Set up engine."""
