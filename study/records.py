"""Record networks: the exercise's literal answer, a network that learns f, with its proof.

The tutorial asks for the least width w_1 (one hidden layer; w_2: neurons over several) at which
training *can* learn f: an existence claim. A record is a network found to learn f, trained
from scratch, kept as two files under `results/records/`: NAME.safetensors (the weights, under
`study.models.DeepNeuralNet`'s state-dict names, so that `load_state_dict(
safetensors.torch.load_file(path))` loads them; never a pickle) and NAME.json (profile,
function seed, bits, recipe, init seed, budget, epoch reached, loss, code commit, torch
version and the command that found it).

`verify` needs neither torch nor a store, and takes well under a second: f is rebuilt from its
seed with numpy's MT19937 (torch's CPU generator: one raw 32-bit word per target bit, the bit
is the word's lowest; a test compares it with `study.data.boolean_function`), the network runs
in float64, and the record holds when the full-table mean binary cross-entropy is at most the
target and every bit is right.

`study.record_search` finds them; this module imports neither torch nor the engine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from study.errors import StudyError

RECORDS_DIR = Path("results/records")


class RecordError(StudyError):
    """A record file that cannot be read (missing, not a record, weights not matching)."""


# ----------------------------------------------------------------------------------------------
# reading and checking a record (numpy only)


def truth_table(input_bits: int, output_bits: int, function_seed: int):
    """(inputs, targets) of f as float64 arrays: what `study.data.boolean_function` draws with
    torch, drawn with numpy (torch seeds its MT19937 with the seed's low 32 bits)."""
    rows = np.arange(2**input_bits)
    inputs = ((rows[:, None] >> np.arange(input_bits)) & 1).astype(np.float64)
    state = np.random.RandomState(function_seed & 0xFFFFFFFF).get_state()
    generator = np.random.MT19937()
    generator.state = {"bit_generator": "MT19937", "state": {"key": state[1], "pos": state[2]}}
    words = generator.random_raw(2**input_bits * output_bits)
    targets = (words % 2).reshape(2**input_bits, output_bits).astype(np.float64)
    return inputs, targets


def layer_names(depth: int) -> list[str]:
    """The state-dict prefixes of `DeepNeuralNet`'s linear layers (ReLUs sit between them)."""
    return [f"layers.{2 * i}" for i in range(depth)] + ["output_layer"]


@dataclass(frozen=True)
class Check:
    """What `verify` found for one record."""

    path: Path
    loss: float
    wrong_bits: int
    target_loss: float
    profile: tuple[int, ...]
    function_seed: int

    @property
    def holds(self) -> bool:
        return self.loss <= self.target_loss and self.wrong_bits == 0

    def line(self) -> str:
        verdict = "holds" if self.holds else "FAILS"
        return (
            f"{self.path}: {verdict}: hidden {'-'.join(map(str, self.profile))} "
            f"({sum(self.profile)} neurons), function seed {self.function_seed}: loss "
            f"{self.loss:.6g} (target {self.target_loss:g}), {self.wrong_bits} wrong bits"
        )


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A record's description and weights (`path`: the .json or the .safetensors)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    base = Path(path).with_suffix("")
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        weights = load_file(base.with_suffix(".safetensors"))
    except (OSError, ValueError, SafetensorError) as error:
        raise RecordError(f"{path}: not a readable record ({error})") from None
    if not isinstance(meta, dict) or meta.get("kind") != "boolean-record":
        raise RecordError(f"{path}: not a record of this tool (no kind boolean-record)")
    return meta, weights


def verify(path: str | Path) -> Check:
    """Rebuild f from the record's function seed, run its network in float64, check it."""
    meta, weights = read(path)
    try:
        profile = tuple(int(w) for w in meta["hidden_layer_profile"])
        seed, n, m = (int(meta[k]) for k in ("function_seed", "input_bits", "output_bits"))
        target = float(meta["target_loss"])
    except (KeyError, TypeError, ValueError) as error:
        raise RecordError(f"{path}: record lacks or garbles {error}") from None
    if not (1 <= n <= 16 and 1 <= m <= 64 and 0 <= seed < 2**63):
        raise RecordError(f"{path}: bits or function seed out of range")
    dims = [n, *profile, m]
    h, y = truth_table(n, m, seed)
    names = layer_names(len(profile))
    if set(weights) != {f"{p}.{k}" for p in names for k in ("weight", "bias")}:
        raise RecordError(f"{path}: weights are not those of a {len(profile)}-layer network")
    for i, prefix in enumerate(names):
        w, b = weights[prefix + ".weight"], weights[prefix + ".bias"]
        if w.shape != (dims[i + 1], dims[i]) or b.shape != (dims[i + 1],):
            raise RecordError(f"{path}: {prefix} has shape {w.shape}, not {dims[i + 1], dims[i]}")
        h = h @ w.astype(np.float64).T + b.astype(np.float64)
        if i < len(profile):
            h = np.maximum(h, 0.0)
    # mean binary cross-entropy on logits, stable: max(z, 0) - z y + log(1 + e^-|z|)
    loss = float(np.mean(np.maximum(h, 0) - h * y + np.log1p(np.exp(-np.abs(h)))))
    wrong = int(np.sum((h > 0) != (y > 0.5)))
    if not math.isfinite(loss):
        loss = math.inf
    return Check(Path(path), loss, wrong, target, profile, seed)


def name_of(function_seed: int, profile: Sequence[int]) -> str:
    return f"f{function_seed}-d{len(profile)}-" + "-".join(map(str, profile))


def write(
    directory: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any], suffix: str = ""
) -> Path:
    """Write a record (`tensors` by their state-dict names) and return its JSON's path."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    base = directory / (name_of(meta["function_seed"], meta["hidden_layer_profile"]) + suffix)
    save_file(tensors, str(base.with_suffix(".safetensors")))
    base.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return base.with_suffix(".json")


def remove(path: Path) -> None:
    for suffix in (".json", ".safetensors"):
        path.with_suffix(suffix).unlink(missing_ok=True)


PLAIN = "plain training from scratch"
"""The method of the first track's records (the second's: `record_search.PRUNED`)."""


def smallest(directory: str | Path = RECORDS_DIR) -> dict[tuple[int, int, str], dict[str, Any]]:
    """The smallest record of each (function seed, depth, method) in `directory` that verifies
    (its JSON, with `file`), fewest neurons first, then fewest epochs."""
    best: dict[tuple[int, int, str], dict[str, Any]] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            if not verify(path).holds:
                continue
        except RecordError:
            continue
        meta = json.loads(path.read_text())
        method = meta.get("method", PLAIN)
        key = (meta["function_seed"], len(meta["hidden_layer_profile"]), method)
        rank = (meta["neurons"], meta["epochs_run"])
        if key not in best or rank < (best[key]["neurons"], best[key]["epochs_run"]):
            best[key] = {**meta, "file": str(path)}
    return dict(sorted(best.items()))
