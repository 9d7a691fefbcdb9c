"""``predict --devices N --num-nodes M --strategy ddp``: one raster predicted by several processes.

Lightning starts the processes (DDP: NCCL on GPUs, gloo on CPUs; each process runs the same
command again) and ``Trainer.predict`` hands each one its share of a dataset of row blocks:
consecutive rows of tiles of the raster, assigned to the processes as contiguous runs, so each
process predicts one band of rows. ``predict_strips`` over that band runs exactly the tiles,
weights and order of a whole-raster run (plus the rows of tiles above it that overlap it), so the
pixels equal a single process's. Each process writes its rows into its own GeoTIFFs (one per
output: class raster, probabilities, uncertainty; only its rows) in a hidden folder beside the
output, and a record of what it did. Rank 0 waits for every record, then mosaics the files with a
GDAL VRT (sources side by side, never overlapping, so no file's nodata covers another's pixels)
and writes the outputs through the single-process tail (COG copy, polygons, style, atomic
renames). The folder is removed at the end, also on failure or cancel.

Cancel: rank 0's cancel (SIGTERM or ``cancel`` on stdin) leaves a flag file in the folder that
every process checks before every batch. A failing process records its error and raises a flag
that stops the others; rank 0 then reports the error. With several nodes, the output's folder
must be on a file system every node shares.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import rasterio

import engine.models  # noqa: F401 - the torchvision fix, before Lightning imports torchvision
import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from engine.data.chips import tile_starts
from engine.inference.predict import Job, StripWriter, _Cancelled, open_outputs, predict_strips
from engine.inference.runners import cpu_count, load_runner
from engine.protocol import EngineError, Reporter

STRATEGIES = ("auto", "ddp")
BLOCK_BYTES = 256 * 2 ** 20  # the blended probabilities of one row block, at most (float32)
BLOCK_TILE_ROWS = 4  # rows of tiles per block, at most
_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
               "float32": "Float32", "float64": "Float64"}


@dataclass
class Plan:
    """How many processes predict: ``devices`` per node on ``num_nodes`` nodes."""

    accelerator: str  # cpu or gpu
    devices: int
    num_nodes: int
    strategy: str

    @property
    def processes(self) -> int:
        return self.devices * self.num_nodes


@dataclass
class Done:
    """What rank 0 has once every process has written its part."""

    runner: object
    sources: dict  # output name -> the mosaic (VRT) of the processes' files
    run_tiles: int
    processes: int


def plan_processes(device: str, devices, num_nodes, strategy: str) -> Plan | None:
    """Check ``--devices``/``--num-nodes``/``--strategy`` against ``--device`` and this machine;
    None when they come to one process (predicted as usual, without Lightning)."""
    strategy = str(strategy).strip().lower()
    if strategy not in STRATEGIES:
        raise EngineError(f"--strategy {strategy} is not supported by predict",
                          hint="use --strategy ddp (or auto, which is ddp with several processes)")
    try:
        nodes = int(num_nodes)
    except (TypeError, ValueError):
        nodes = 0
    if nodes < 1:
        raise EngineError(f"--num-nodes {num_nodes} must be a whole number ≥ 1")
    text = str(devices).strip().lower()
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise EngineError(f"--devices {devices} must be a whole number ≥ 1 or auto",
                          hint="e.g. --devices 2: two processes on this machine (GPUs, or CPU cores)")
    from engine.training.train import resolve_accelerator

    accelerator, _ = resolve_accelerator(device, "32")  # refuses --device gpu without a GPU
    if accelerator == "gpu":
        available = torch.cuda.device_count()
        count = available if text == "auto" else int(text)
        if count > available:
            raise EngineError(f"--devices {count} asks for {count} GPUs but this machine has {available}",
                              hint=f"use --devices {available} or fewer (or --device cpu for CPU processes)")
    else:
        count = 1 if text == "auto" else int(text)
        if count > cpu_count():
            raise EngineError(f"--devices {count} CPU processes but this process may use {cpu_count()} cores",
                              hint=f"use --devices {cpu_count()} or fewer")
    if count * nodes == 1:
        return None
    return Plan(accelerator, count, nodes, "ddp")


def row_blocks(height: int, width: int, size: int, overlap: int, classes: int, processes: int) -> list:
    """The dataset: (first, end) raster rows of blocks of consecutive rows of tiles, each row of
    tiles contributing the output rows it finishes. A block holds at most ``BLOCK_TILE_ROWS``
    rows of tiles and ``BLOCK_BYTES`` of probabilities, and each process gets about four blocks
    where the raster has enough rows of tiles (progress; a process's blocks continue one run of
    ``predict_strips``, so smaller blocks cost nothing)."""
    starts = tile_starts(height, size, size - overlap)
    ends = starts[1:] + [height]
    tallest = max(e - s for s, e in zip(starts, ends))
    k = max(1, min(BLOCK_TILE_ROWS, BLOCK_BYTES // max(1, tallest * width * classes * 4)))
    k = min(k, max(1, math.ceil(len(starts) / (4 * processes))))  # some blocks per process: progress
    return [(starts[j], ends[min(j + k, len(starts)) - 1]) for j in range(0, len(starts), k)]


def share(blocks: int, processes: int, rank: int) -> range:
    """The blocks of ``rank``: a contiguous run, the runs as even as whole blocks allow."""
    return range(rank * blocks // processes, (rank + 1) * blocks // processes)


def predict_distributed(plan: Plan, job: Job, stack, region, wanted: list[str], out: Path, runner,
                        precision: str, reporter: Reporter, cleanup: contextlib.ExitStack) -> Done | None:
    """Predict ``stack`` in ``plan.processes`` processes (this process is one of them). Rank 0
    returns the mosaics of every output in ``wanted``; the other ranks return None once their
    part is written. ``runner``: the model loaded on the CPU (kept by CPU processes running
    PyTorch). The work folder is removed when ``cleanup`` closes (rank 0)."""
    from lightning.pytorch.strategies import DDPStrategy

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    grid = stack.grid
    blocks = row_blocks(grid.height, grid.width, job.size, job.overlap, len(job.classes), plan.processes)
    module = _BlockPredictor(job, stack, region, blocks, out, runner, precision, reporter)
    writer = _RankFiles(job, grid, wanted, reporter)
    trainer = L.Trainer(accelerator=plan.accelerator, devices=plan.devices, num_nodes=plan.num_nodes,
                        strategy=DDPStrategy(process_group_backend="nccl" if plan.accelerator == "gpu" else "gloo"),
                        precision="32-true", callbacks=[writer], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    if trainer.is_global_zero:
        cleanup.callback(_remove_workdir, module, trainer)
    trainer.predict(module, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    records = _wait_for_records(module, trainer)
    failed = [r for r in records if r.get("error")]
    if failed:
        error = failed[0]["error"]
        where = f"process {failed[0]['rank']} of {len(records)}"
        if error["type"] == "EngineError":
            raise EngineError(f"{where}: {error['message']}", hint=error.get("hint"))
        print(f"{where}: {error['traceback']}", file=sys.stderr)  # its traceback, for the log
        raise RuntimeError(f"{where} failed: {error['type']}: {error['message']}")
    sources = {}
    for name in wanted:
        parts = [(module.workdir / _part_name(r["rank"], name), tuple(r["rows"])) for r in records if r["rows"]]
        sources[name] = module.workdir / f"{name}.vrt"
        write_mosaic(sources[name], parts, grid)
    return Done(module.runner, sources, sum(r["run"] for r in records), len(records))


def _part_name(rank: int, name: str) -> str:
    return f"rank{rank:05d}.{name}.tif"


def _record_name(rank: int) -> str:
    return f"rank{rank:05d}.json"


def _wait_for_records(module, trainer) -> list[dict]:
    """Rank 0: wait until every process has recorded its part (polled, so a cancel still acts
    while the others run); a process of this node that ended without a record is an error."""
    world = trainer.world_size
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    while True:
        missing = [r for r in range(world) if not (module.workdir / _record_name(r)).exists()]
        if not missing:
            break
        if module.user_cancelled():
            raise _Cancelled
        for rank, proc in enumerate(procs, start=1):
            if rank in missing and proc.poll() is not None and not (module.workdir / _record_name(rank)).exists():
                raise RuntimeError(f"prediction process {rank} ended (exit status {proc.returncode}) without "
                                   "writing its part; its messages are above")
        time.sleep(0.1)
    return [json.loads((module.workdir / _record_name(r)).read_text()) for r in range(world)]


def _remove_workdir(module, trainer) -> None:
    """Rank 0, on leaving: let this node's other processes end (they stop at the cancel/failure
    flag), then remove the work folder."""
    if module.workdir is None:
        return
    if module.user_cancelled() or not all((module.workdir / _record_name(r)).exists()
                                          for r in range(trainer.world_size)):
        with contextlib.suppress(OSError):
            (module.workdir / "failed").touch()  # stop whoever still predicts
    deadline = time.monotonic() + 60
    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        with contextlib.suppress(Exception):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    shutil.rmtree(module.workdir, ignore_errors=True)


def _first(batch):
    return batch[0]


class _Blocks:
    """The dataset: block i is its index (the module knows the blocks' rows)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return i


class _RunSampler:
    """This rank's contiguous run of blocks, in order; [-1] (nothing to do) for a rank without
    blocks, so every rank runs the same hooks."""

    def __init__(self, run: range):
        self.indices = list(run) or [-1]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class _BlockPredictor(L.LightningModule):
    """predict_step(block) → the block's strips. Consecutive blocks of a rank continue one
    ``predict_strips`` over the rank's rows, so no row of tiles runs twice within a rank."""

    def __init__(self, job: Job, stack, region, blocks: list, out: Path, runner, precision: str,
                 reporter: Reporter):
        super().__init__()
        self.job, self.stack, self.region, self.blocks = job, stack, region, blocks
        self.out, self.reporter = out, reporter
        self._cpu_runner, self._precision = runner, precision
        self.workdir: Path | None = None
        self.runner = None
        self.run: range = range(0)
        self.failure: dict | None = None
        self._strips = None
        self._next = None  # the row the open predict_strips continues at

    # -- setup -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        path = None
        if trainer.is_global_zero:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            path = tempfile.mkdtemp(prefix=f".{self.out.name}.geopeft-", suffix=".parts", dir=self.out.parent)
        self.workdir = Path(trainer.strategy.broadcast(path))
        self.run = share(len(self.blocks), trainer.world_size, trainer.global_rank)
        self.runner = self._load_runner()

    def _load_runner(self):
        """This process's runner: on its GPU, or on its share of this node's cores."""
        device = self.trainer.strategy.root_device
        model = self.job.model
        onnx = model.lower().endswith(".onnx")
        if device.type == "cuda":
            runner = load_runner(model, "gpu" if onnx else f"cuda:{device.index}", Reporter("quiet"), self._precision,
                                 trust_checkpoint=self.job.trust_checkpoint)
            if onnx and runner.device != "cpu" and device.index:  # onnxruntime: GPU 0 unless told
                providers = runner.session.get_providers()
                runner.session.set_providers(providers, [{"device_id": str(device.index)} if p != "CPUExecutionProvider"
                                                         else {} for p in providers])
                runner.device = f"cuda:{device.index}"
            return runner
        local = self.trainer.num_devices  # processes on this node
        threads = max(1, cpu_count() // local)
        with contextlib.suppress(AttributeError, OSError):  # each process on its own cores (Linux)
            cores = sorted(os.sched_getaffinity(0))
            if len(cores) >= local:
                i = self.trainer.local_rank
                mine = cores[i * len(cores) // local:(i + 1) * len(cores) // local]
                os.sched_setaffinity(0, mine)
                threads = len(mine)
        torch.set_num_threads(threads)
        if not onnx:
            return self._cpu_runner
        return load_runner(model, "cpu", Reporter("quiet"), self._precision)  # onnxruntime: threads = its cores

    def predict_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader(_Blocks(len(self.blocks)), batch_size=1, sampler=_RunSampler(self.run),
                          collate_fn=_first, num_workers=0)

    @property
    def rows(self) -> tuple[int, int] | None:
        """The raster rows this rank predicts, None for none."""
        if not len(self.run):
            return None
        return self.blocks[self.run[0]][0], self.blocks[self.run[-1]][1]

    # -- cancel and failure -----------------------------------------------------------------
    def user_cancelled(self) -> bool:
        """A cancel here (the reporter) or in any process (the flag file, which this sets)."""
        if self.workdir is None:
            return self.reporter.cancelled
        if self.reporter.cancelled:
            with contextlib.suppress(OSError):
                (self.workdir / "cancel").touch()
            return True
        return (self.workdir / "cancel").exists()

    def _stop(self) -> bool:
        return self.user_cancelled() or (self.workdir / "failed").exists()

    def fail(self, exc: BaseException) -> None:
        """Record this process's first error and stop the others (they still record their part)."""
        if self.failure is None:
            self.failure = {"type": type(exc).__name__, "message": getattr(exc, "message", None) or str(exc),
                            "hint": getattr(exc, "hint", None), "traceback": traceback.format_exc()}
        with contextlib.suppress(OSError):
            (self.workdir / "failed").touch()
        self.close_strips()

    def close_strips(self) -> None:
        if self._strips is not None:
            strips, self._strips = self._strips, None
            strips.close()  # ends its reader thread

    # -- prediction --------------------------------------------------------------------------
    def predict_step(self, index, batch_idx=0):
        index = int(index)
        if index < 0 or self.failure is not None:
            return []
        first, end = self.blocks[index]
        try:
            if self._strips is None or self._next != first:
                self.close_strips()
                job = self.job
                self._strips = predict_strips(self.stack, self.runner, job.mean, job.std, job.size, job.overlap,
                                              job.batch_size, self.region, rows=(first, self.rows[1]),
                                              cancelled=self._stop)
            strips, row = [], first
            while row < end:
                strip = next(self._strips)
                strips.append(strip)
                row = strip.row + strip.valid.shape[0]
            self._next = end
            return strips
        except _Cancelled:
            if self.user_cancelled():
                self.close_strips()
                raise
            self.close_strips()  # another process failed: stop, still record this part
            return []
        except Exception as exc:  # noqa: BLE001 - recorded, reported by rank 0
            self.fail(exc)
            return []


class _RankFiles(BasePredictionWriter):
    """Writes a rank's strips into its own GeoTIFFs (its rows only), then its record."""

    def __init__(self, job: Job, grid, wanted: list[str], reporter: Reporter):
        super().__init__("batch")
        self.job, self.grid, self.wanted, self.reporter = job, grid, wanted, reporter
        self.files: contextlib.ExitStack | None = None
        self.writer = None
        self.tiles = self.run = 0
        self.total = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        rows = pl_module.rows
        # Lightning's SIGTERM handler signals and broadcasts to the other processes from inside the
        # handler (a process that has finished its part would never answer): the reporter's own
        # handler instead, whose cancel the cancel flag passes on (checked before every batch).
        self.reporter.install_cancel_handlers()
        if trainer.is_global_zero:
            stride = self.job.size - self.job.overlap
            starts = tile_starts(self.grid.height, self.job.size, stride)
            cols = len(tile_starts(self.grid.width, self.job.size, stride))
            self.total = cols * sum(1 for s in starts if rows and rows[0] <= s < rows[1])
        if rows is None:
            return
        self.files = contextlib.ExitStack()
        try:
            paths = {name: pl_module.workdir / _part_name(trainer.global_rank, name) for name in self.wanted}
            dst, pdst, udst = self.files.enter_context(open_outputs(paths, self.job, self.grid, rows))
            self.writer = self.files.enter_context(StripWriter(dst, pdst, udst, self.job.values, self.job.nodata,
                                                               row0=rows[0]))
        except Exception as exc:  # noqa: BLE001
            pl_module.fail(exc)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if pl_module.failure is not None or not prediction:
            return
        try:
            for strip in prediction:
                self.writer.submit(strip)
                self.tiles += strip.tiles
                self.run += strip.run
        except Exception as exc:  # noqa: BLE001
            pl_module.fail(exc)
            return
        if trainer.is_global_zero:
            self.reporter.progress("predict", self.tiles, self.total, f"process 1 of {trainer.world_size} "
                                   f"(its share of the rows)", tiles=self.tiles, run=self.run)

    def on_predict_end(self, trainer, pl_module) -> None:
        try:
            self._close()
        except Exception as exc:  # noqa: BLE001
            pl_module.fail(exc)
        pl_module.close_strips()
        record = {"rank": trainer.global_rank, "rows": pl_module.rows if pl_module.failure is None else None,
                  "tiles": self.tiles, "run": self.run, "error": pl_module.failure}
        tmp = pl_module.workdir / (_record_name(trainer.global_rank) + ".partial")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, pl_module.workdir / _record_name(trainer.global_rank))
        if trainer.is_global_zero and trainer.world_size > 1:
            self.reporter.progress("predict", self.tiles, self.total, "process 1 has done its rows; waiting for "
                                   "the others", tiles=self.tiles, run=self.run)

    def on_exception(self, trainer, pl_module, exception) -> None:
        pl_module.close_strips()
        with contextlib.suppress(Exception):
            self._close()

    def _close(self) -> None:
        if self.files is not None:
            files, self.files = self.files, None
            files.close()


def write_mosaic(path: Path, parts: list, grid) -> None:
    """A GDAL VRT on ``grid`` joining ``parts`` [(file, (first, end) rows)]: each file fills its
    own rows (source and destination rectangles side by side, never overlapping). Band types,
    nodata, descriptions, tags and colour table come from the first file."""
    with rasterio.open(parts[0][0]) as first:
        dtypes, nodata, count = first.dtypes, first.nodatavals, first.count
        descriptions, tags = first.descriptions, first.tags()
        try:
            colours = first.colormap(1)
        except ValueError:
            colours = None
    t = grid.transform
    lines = [f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">']
    if grid.crs is not None:
        lines.append(f"  <SRS>{escape(grid.crs.to_wkt())}</SRS>")
    lines.append(f"  <GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>")
    if tags:
        lines.append("  <Metadata>")
        lines += [f"    <MDI key={quoteattr(k)}>{escape(v)}</MDI>" for k, v in tags.items()]
        lines.append("  </Metadata>")
    for b in range(1, count + 1):
        lines.append(f'  <VRTRasterBand dataType="{_GDAL_TYPES[dtypes[b - 1]]}" band="{b}">')
        if nodata[b - 1] is not None:
            lines.append(f"    <NoDataValue>{nodata[b - 1]!r}</NoDataValue>")
        if descriptions[b - 1]:
            lines.append(f"    <Description>{escape(descriptions[b - 1])}</Description>")
        if b == 1 and colours:
            lines.append("    <ColorInterp>Palette</ColorInterp>")
            lines.append("    <ColorTable>")
            for i in range(max(colours) + 1):
                c = colours.get(i, (0, 0, 0, 0))
                lines.append(f'      <Entry c1="{c[0]}" c2="{c[1]}" c3="{c[2]}" c4="{c[3]}"/>')
            lines.append("    </ColorTable>")
        for file, (top, end) in parts:
            rel = os.path.relpath(file, path.parent)
            lines += ["    <SimpleSource>",
                      f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                      f"      <SourceBand>{b}</SourceBand>",
                      f'      <SrcRect xOff="0" yOff="0" xSize="{grid.width}" ySize="{end - top}"/>',
                      f'      <DstRect xOff="0" yOff="{top}" xSize="{grid.width}" ySize="{end - top}"/>',
                      "    </SimpleSource>"]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    path.write_text("\n".join(lines) + "\n")
