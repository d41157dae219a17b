"""Resumable quantization: the pipeline's state after each block, on disk, written atomically.

    state = RunState(resume_dir, fingerprint(model, ids, config, ...))
    done, results, hiddens = state.load(model)     # (0, {}, None) for a fresh directory
    ...                                             # after block i:
    state.save(i, block_results, hiddens, block_digest)

The directory holds, for each finished block i, ``block_{i:04d}.safetensors`` (its GPTQResults'
tensors: codes, scales, zeros, g_idx, column_loss, perm, dead_channels, and qweight/qzeros when
packed), the inputs of the next block (``hidden_{i+1:04d}.safetensors``, one tensor per
calibration batch; the other forward kwargs (masks, rotary embeddings) are recomputed from the
calibration on resume, they are the same for every block), and ``state.json`` (the
fingerprint, the scalars of each result, every file's size and CRC-32). Each file is written
to a temporary sibling and renamed into place, ``state.json`` last, so a run killed at any
instant leaves the previous consistent state.

A state whose fingerprint (config, method, compute dtype, device type, batch size, calibration
ids, a sample of every parameter) differs from the run's, or whose files do not match their
recorded size and CRC, is refused with ``ResumeError``: delete the directory to start over.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write_text, chmod_per_umask
from .config import QuantConfig
from .errors import GPTQLabError
from .gptq import GPTQResult

STATE_NAME = "state.json"
VERSION = 1
_TENSORS = ("codes", "scales", "zeros", "g_idx", "column_loss", "perm", "dead_channels", "qweight", "qzeros")
_SCALARS = ("damp_used", "damp_escalations", "condition_number", "bits", "group_size", "sym", "notes")


class ResumeError(GPTQLabError, ValueError):
    """A resume directory that belongs to another run, or whose files are damaged."""


def module_digest(module: nn.Module, samples: int = 4096) -> str:
    """SHA-256 of every parameter's name, shape, dtype and ``samples`` evenly strided values.

    Cheap for a 7B model (it reads a few thousand values per tensor, also from memory-mapped
    weights), and any realistic change of weights (another checkpoint, another seed) changes it.
    """
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].float().cpu()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, config: QuantConfig,
                **run) -> dict:
    """What must match for a state to be resumed. ``run``: other settings (method, dtype...)
    as JSON-able values. Blocks get one digest each (see ``RunState.load``)."""
    block_ids = {id(p) for p in blocks.parameters()}
    rest = hashlib.sha256()
    for name, p in model.named_parameters():
        if id(p) not in block_ids:
            flat = p.detach().reshape(-1)
            rest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            rest.update(flat[::max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes())
    ids_cpu = ids.detach().cpu().long().contiguous()
    return {
        "config": json.loads(json.dumps(config.to_dict(), sort_keys=True)),
        "run": {k: str(v) for k, v in sorted(run.items())},
        "calibration": f"{tuple(ids_cpu.shape)}:{hashlib.sha256(ids_cpu.numpy().tobytes()).hexdigest()}",
        "model": rest.hexdigest(),
        "blocks": [module_digest(b) for b in blocks],
    }


class RunState:
    """The resume directory of one run (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.manifest: dict | None = None

    # ------------------------------------------------------------------ reading

    def load(self, blocks: nn.ModuleList):
        """-> (blocks_done, {name: GPTQResult}, [hidden per batch] or None). A missing or empty
        directory is a fresh start; anything else must be a valid state of this very run."""
        path = self.dir / STATE_NAME
        if not path.exists():
            if self.dir.exists() and any(p for p in self.dir.iterdir() if not p.name.startswith(".")):
                raise ResumeError(f"{self.dir} is not empty but holds no {STATE_NAME}; it is not a resume "
                                  f"directory of gptq_lab: pass an empty or new directory")
            return 0, {}, None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ResumeError(f"{path} is unreadable ({e}); delete {self.dir} to start over") from None
        if not isinstance(manifest, dict):
            raise ResumeError(f"{path} is not a valid resume state (not a JSON object); delete {self.dir} "
                              f"to start over")
        self._check_fingerprint_safely(manifest, blocks, path)
        done = int(manifest["blocks_done"])
        results: dict[str, GPTQResult] = {}
        for i in range(done):
            tensors = self._read(manifest, f"block_{i:04d}.safetensors")
            for name, scalars in manifest["results"][str(i)].items():
                results[name] = _result_from(name, tensors, scalars)
        hiddens = None
        if done < len(blocks):                     # the inputs of the next block
            t = self._read(manifest, f"hidden_{done:04d}.safetensors")
            hiddens = [t[f"batch.{j}"] for j in range(len(t))]
        self.manifest = manifest
        return done, results, hiddens

    def _check_fingerprint_safely(self, manifest: dict, blocks: nn.ModuleList, path: Path) -> None:
        try:
            self._check_fingerprint(manifest, blocks)
            int(manifest["blocks_done"]), manifest["files"].get, manifest["results"].get
        except ResumeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ResumeError(f"{path} is not a valid resume state ({type(e).__name__}: {e}); delete "
                              f"{self.dir} to start over") from None

    def _check_fingerprint(self, manifest: dict, blocks: nn.ModuleList) -> None:
        if manifest.get("version") != VERSION:
            raise ResumeError(f"{self.dir} holds a state of version {manifest.get('version')!r}, this "
                              f"gptq_lab writes version {VERSION}; delete it to start over")
        old, new = manifest["fingerprint"], self.fingerprint
        for key in ("config", "run", "calibration", "model"):
            if old[key] != new[key]:
                raise ResumeError(f"{self.dir} holds the state of another run: its {key} differs "
                                  f"(saved {_short(old[key])}, now {_short(new[key])}). Resume with the "
                                  f"same model, calibration and settings, or use a new directory")
        if len(old["blocks"]) != len(new["blocks"]):
            raise ResumeError(f"{self.dir}: saved for {len(old['blocks'])} blocks, the model has "
                              f"{len(new['blocks'])}")
        done = int(manifest["blocks_done"])
        for i, (was, now) in enumerate(zip(old["blocks"], new["blocks"])):
            # a finished block may already hold its quantized weights (a resume in the same process)
            allowed = {was, manifest["quantized_blocks"].get(str(i))} if i < done else {was}
            if now not in allowed:
                raise ResumeError(f"{self.dir} holds the state of another run: the weights of block {i} "
                                  f"differ from the saved run's. Resume with the same model, or use a new "
                                  f"directory")

    def _read(self, manifest: dict, name: str) -> dict[str, torch.Tensor]:
        path = self.dir / name
        meta = manifest["files"].get(name)
        if meta is None or not path.exists():
            raise ResumeError(f"{path} is missing from the resume state; delete {self.dir} to start over")
        if path.stat().st_size != meta["size"] or _crc32(path) != meta["crc32"]:
            raise ResumeError(f"{path} is damaged (size or CRC-32 differs from the one recorded when it "
                              f"was written); delete {self.dir} to start over")
        return load_file(str(path))

    # ------------------------------------------------------------------ writing

    def save(self, index: int, results: dict[str, GPTQResult], hiddens: list[torch.Tensor] | None,
             quantized_digest: str) -> None:
        """Record block ``index`` as finished: its results, the next block's inputs, then the manifest."""
        m = self.manifest or {"version": VERSION, "fingerprint": self.fingerprint, "blocks_done": 0,
                              "files": {}, "results": {}, "quantized_blocks": {}}
        assert m["blocks_done"] == index, (m["blocks_done"], index)
        self.dir.mkdir(parents=True, exist_ok=True)
        block_name = f"block_{index:04d}.safetensors"
        tensors = {f"{name}.{f}": getattr(r, f).detach().cpu().contiguous()
                   for name, r in results.items() for f in _TENSORS if getattr(r, f) is not None}
        m["files"][block_name] = self._write(block_name, tensors)
        m["results"][str(index)] = {name: {f: getattr(r, f) for f in _SCALARS} for name, r in results.items()}
        m["quantized_blocks"][str(index)] = quantized_digest
        old_hidden = f"hidden_{index:04d}.safetensors"
        if hiddens is not None:
            name = f"hidden_{index + 1:04d}.safetensors"
            m["files"][name] = self._write(name, {f"batch.{j}": h.detach().cpu().contiguous()
                                                  for j, h in enumerate(hiddens)})
        m["files"].pop(old_hidden, None)
        m["blocks_done"] = index + 1
        atomic_write_text(self.dir / STATE_NAME, json.dumps(m, indent=1))
        self.manifest = m
        (self.dir / old_hidden).unlink(missing_ok=True)

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> dict:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=self.dir)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            chmod_per_umask(Path(tmp))
            meta = {"size": os.path.getsize(tmp), "crc32": _crc32(Path(tmp))}
            os.replace(tmp, self.dir / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return meta


def _result_from(name: str, tensors: dict[str, torch.Tensor], scalars: dict) -> GPTQResult:
    fields = {f: tensors.get(f"{name}.{f}") for f in _TENSORS}
    return GPTQResult(**fields, **scalars)


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 120 else s[:117] + "..."
