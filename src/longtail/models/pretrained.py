"""Weights for a backbone from elsewhere: reading a weights file and fitting it to a backbone.

A file is a state_dict (``torch.save``'d, optionally under ``state_dict`` or ``model``, or a
``.safetensors`` file), or a longtail checkpoint, whose ``backbone.`` weights are taken. The
classifier of the network the weights come from is left out: a backbone has none, and every
run's classifier starts fresh.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

try:  # a dependency of timm; only .safetensors files need it
    from safetensors.torch import load_file as load_safetensors
except ImportError:  # pragma: no cover - exercised where safetensors is absent
    load_safetensors = None

# Prefixes a saved network puts before its backbone's names (DDP's module., a timm model
# inside our TimmBackbone) and the names of classifier layers that a backbone does not have.
_WRAPPERS = ("module.", "model.")
_CLASSIFIERS = ("fc", "classifier", "head", "head.fc", "last_linear", "heads.head")


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The backbone weights in file ``path`` (see the module docstring).

    Raises:
        ValueError: Naming the file and what it holds when it holds no state_dict.
    """
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        if load_safetensors is None:
            raise ValueError(f"{path} is a .safetensors file: pip install safetensors")
        return dict(load_safetensors(str(path)))
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error says it
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        reason = " ".join(str(e).split()).split(". ")[0][:120]
        raise ValueError(
            f"{path} is not a weights file torch can read with weights_only ({reason}); save "
            "the network's state_dict() (a pickled whole model is refused: it runs code)"
        ) from None
    if isinstance(saved, Mapping) and "config" in saved and isinstance(saved.get("model"), Mapping):
        model = saved["model"]  # a longtail checkpoint: its backbone
        return {
            k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")
        }
    for key in ("state_dict", "model"):
        if isinstance(saved, Mapping) and isinstance(saved.get(key), Mapping):
            saved = saved[key]
            break
    if not isinstance(saved, Mapping) or not all(isinstance(v, Tensor) for v in saved.values()):
        raise ValueError(f"{path} holds no state_dict (a mapping of names to tensors)")
    return dict(saved)


def _bare(name: str) -> str:
    """``name`` without the wrapper prefixes in front of it."""
    while name.startswith(_WRAPPERS):
        name = name.split(".", 1)[1]
    return name


def _match_names(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` named as the backbone names it: wrapper prefixes removed, and ours (a timm
    model's ``model.``) added where the backbone has it."""
    bare = {_bare(k): v for k, v in state.items()}
    for prefix in ("", *_WRAPPERS):
        renamed = {prefix + k: v for k, v in bare.items()}
        if any(k in own for k in renamed):
            return renamed
    return bare


def _is_classifier(name: str) -> bool:
    return any(_bare(name).startswith(c + ".") for c in _CLASSIFIERS)


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load ``state`` into ``backbone``: names matched up to a wrapper prefix, the source
    network's classifier left out, an RGB first layer summed over its colours for grey
    images (as timm does).

    Raises:
        ValueError: One line naming the parameters missing from ``state``, those it has that
            the backbone lacks, and those of another shape.
    """
    own = backbone.state_dict()
    state = _match_names(state, own)
    fitted: dict[str, Tensor] = {}
    shapes: list[str] = []
    for name, value in state.items():
        if name not in own:
            continue
        want = own[name].shape
        if value.shape != want and value.dim() == 4 and value.shape[1] == 3 and want[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # an RGB stem for grey images
        if value.shape != want:
            shapes.append(f"{name} {tuple(value.shape)} (backbone: {tuple(want)})")
            continue
        fitted[name] = value.to(own[name].dtype)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own and not _is_classifier(k)]
    problems = [
        _listed(f"{len(missing)} missing", missing),
        _listed(f"{len(extra)} the backbone lacks", extra),
        _listed(f"{len(shapes)} of another shape", shapes),
    ]
    said = "; ".join(p for p in problems if p)
    if said:
        raise ValueError(f"the weights do not fit the backbone: {said}")
    backbone.load_state_dict(fitted, strict=False)


def _listed(what: str, names: list[str], shown: int = 3) -> str:
    if not names:
        return ""
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return f"{what} ({', '.join(names[:shown])}{more})"
