"""Every method's step is its paper's formula, and every numeric option does what it says.

Generated from the registries: for every registered method, every epoch of a short run is
walked one step at a time in float64 (a real batch from each of the stage's loaders), and
the loss terms, the state after the optimizer step (EMA encoders, queues, MaxNorm), the
stages, the loaders and the prediction are compared with ``method_references.REFERENCES``.
Then every numeric option of the method's ``Options`` is perturbed: the walk must change, and
still match the reference, which reads the perturbed option.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import pytest
import torch
from torch import Tensor

from conftest import tiny_config
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict
from longtail.data import loader_sampler, set_loader_epoch
from longtail.errors import UsageError
from longtail.methods import METHODS
from method_references import REFERENCES, section

EPOCHS = 4  # staged methods: 2 + 2; switches (DRW, DRS) at epoch 2 (method_references.section)
LR = 0.1  # the plain SGD step taken between training_step and after_optimizer_step

# Options read only when another option has a value: the test perturbs them in that setting.
CONTEXT: dict[tuple[str, str], dict[str, Any]] = {
    ("Hybrid", "alpha"): {"curriculum": "constant"},  # the constant curriculum's value
    ("Hybrid", "num_prototypes"): {"loss": "mpsc"},
    ("TwoStageSC", "num_prototypes"): {"loss": "mpsc"},
    ("Hybrid", "temperature"): {"loss": "sc"},  # ce-ce has no contrastive loss
    ("TwoStageSC", "temperature"): {"loss": "sc"},
    ("Reweighting", "gamma"): {"loss": "focal"},
    ("Reweighting", "beta"): {"weighting": "class-balanced"},
    ("Reweighting", "reweight_epoch"): {"weighting": "class-balanced"},
    ("Reweighting", "max_margin"): {"loss": "ldam"},
    ("Reweighting", "scale"): {"loss": "ldam"},
    ("Reweighting", "tau"): {"loss": "logit-adjust"},
    ("Decoupling", "tau"): {"kind": "tau-norm", "tau": 1.0},  # no validation split here
    ("TwoStageSC", "classifier_milestones"): {"classifier_schedule": "multistep"},
    ("DSCL", "classifier_milestones"): {"classifier_schedule": "multistep"},
    ("Decoupling", "classifier_milestones"): {"classifier_schedule": "multistep", "kind": "crt"},
    ("Decoupling", "classifier_epochs"): {"kind": "crt"},
    ("Decoupling", "classifier_lr"): {"kind": "crt"},
    ("Decoupling", "classifier_weight_decay"): {"kind": "crt"},
    ("Decoupling", "classifier_batch_size"): {"kind": "crt"},
    ("PaCo", "momentum"): {"momentum_encoder": True},  # gpaco has no momentum encoder
}
# Values to perturb to where the generic ones would not bind: the tiny classifier's weight
# rows have norms near 0.6.
VALUES = {"classifier_max_norm": [0.1]}
# Options that must change nothing a step computes, and why.
NO_EFFECT = {
    "block_size": "anchors are scored in blocks of this many: the same loss in less memory",
}


def build(root, method: dict[str, Any]):
    raw = tiny_config(root, method=method, train={"epochs": EPOCHS, "batch_size": 8})
    cfg = validate(config_from_dict(raw))
    torch.manual_seed(0)
    data = build_data(cfg)
    return data, build_method(cfg, data).double().eval()


def _double(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_double(v) for v in x)
    return x


def _loader_spec(loader, epoch: int, batch) -> tuple[str, int, int]:
    """(sampler drawing this epoch, images per step, views per image) of a real batch."""
    sampler = loader_sampler(loader)
    if hasattr(sampler, "at"):  # a switching sampler (DRS)
        sampler = sampler.first if epoch < sampler.at else sampler.then
    x, y = batch[0], batch[1]
    return sampler.name, len(y), len(x) if isinstance(x, (list, tuple)) else 1


def _state(method) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def walk(method, data) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the method does over a whole short run, one step an epoch, and what its
    reference says it should do: ``(observed, expected)`` of the same structure."""
    ref = REFERENCES[type(method)]
    stages = method.stages()
    seen: dict[str, Any] = {"stages": [(s.name, s.epochs, dict(s.optim)) for s in stages]}
    want: dict[str, Any] = {"stages": ref.stages(method), "loaders": ref.loaders(method)}
    seen["loaders"] = []
    ref.prepare(method)
    epoch = 0
    for stage in stages:
        method.on_stage_start(stage)
        method.eval()
        loaders = method.loaders(data, stage)
        for _ in range(stage.epochs):
            method.on_epoch_start(epoch)
            batches, specs = {}, {}
            for name, loader in loaders.items():
                set_loader_epoch(loader, epoch)
                batch = next(iter(loader))
                specs[name], batches[name] = _loader_spec(loader, epoch, batch), _double(batch)
            seen["loaders"].append(specs)
            before = _state(method)
            terms = method.training_step(batches, epoch)
            with torch.no_grad():
                expected, state_after = ref.step(method, data, batches, epoch)
            trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
            method.zero_grad(set_to_none=True)
            terms["loss"].backward()
            with torch.no_grad():
                for p in trainable.values():
                    if p.grad is not None:
                        p.sub_(LR * p.grad)
            stepped = _state(method)
            method.after_optimizer_step()
            with torch.no_grad():
                changes = state_after(before, stepped)
            # After the hook: what the reference names, else the optimizer's result for
            # trainable parameters and the state before the step for everything else.
            seen[f"terms@{epoch}"] = {k: v.detach() for k, v in terms.items()}
            want[f"terms@{epoch}"] = expected
            after = _state(method)
            seen[f"state@{epoch}"] = after
            # What the step changed (constant buffers made from an option do not count).
            seen[f"delta@{epoch}"] = {k: after[k] - before[k] for k in after}
            want[f"state@{epoch}"] = {
                k: changes.get(k, stepped[k] if k in trainable else before[k]) for k in before
            }
            epoch += 1
    x = torch.randn(5, *batches[next(iter(batches))][0][0].shape[-3:], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))  # fmt: skip
    with torch.no_grad():
        seen["predict"] = method.predict(x)
        want["predict"] = ref.predict(method, data, x)
    return seen, want


def assert_matches(seen: dict[str, Any], want: dict[str, Any], what: str) -> None:
    seen = {k: v for k, v in seen.items() if not k.startswith("delta@")}  # compared as states
    assert seen.keys() == want.keys(), what
    for key in seen:
        a, b = seen[key], want[key]
        if isinstance(a, Tensor):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-6, atol=1e-8, msg=f"{what}: {key}")
        elif key.startswith(("terms@", "state@")):
            assert a.keys() == b.keys(), (what, key, sorted(a), sorted(b))
            for k in a:
                torch.testing.assert_close(
                    a[k], b[k].to(a[k].dtype), rtol=1e-6, atol=1e-8, msg=f"{what}: {key} {k}"
                )
        else:
            assert a == b, (what, key)


def differs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The parts of two walks that differ: the state counts by what the steps changed."""
    out = []
    for key in sorted(k for k in set(a) | set(b) if not k.startswith("state@")):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            same = x.shape == y.shape and torch.allclose(x, y, rtol=1e-10, atol=1e-12)
        elif isinstance(x, dict) and isinstance(y, dict) and key.startswith(("terms", "delta")):
            same = x.keys() == y.keys() and all(
                x[k].shape == y[k].shape and torch.allclose(x[k], y[k], rtol=1e-10, atol=1e-12)
                for k in x
            )
        else:
            same = x == y
        if not same:
            out.append(key)
    return out


# --- every method's step ---------------------------------------------------------------------


def test_every_method_class_has_a_reference():
    missing = {METHODS.get(n).__name__ for n in METHODS.names()} - {c.__name__ for c in REFERENCES}
    assert not missing, f"write a reference in tests/method_references.py for {missing}"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_step_of_a_run_is_the_papers_formula(name, tiny_fmnist):
    data, method = build(tiny_fmnist, section(name))
    seen, want = walk(method, data)
    assert_matches(seen, want, name)
    assert len([k for k in seen if k.startswith("terms@")]) == EPOCHS


# --- every numeric option --------------------------------------------------------------------


def _numeric(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_numeric(a) for a in args if a is not type(None))
    if origin in (tuple, list):
        return all(_numeric(a) for a in args if a is not Ellipsis)
    return annotation in (int, float)


def numeric_options(name: str) -> list[str]:
    fields = METHODS.get(name).Options.model_fields
    return [f for f, info in fields.items() if _numeric(info.annotation)]


def _candidates(option: str, value: Any) -> list[Any]:
    if option in VALUES:
        return VALUES[option]
    if value is None:
        return [2, 4, 1, 0.5]
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value + 1, value - 1, 2 * value, 1]
    if isinstance(value, float):
        return [0.5 * value, 1.5 * value, value + 0.1, 0.3] if value else [0.5, 0.1]
    if isinstance(value, tuple):
        low, high = value
        mid = (low + high) / 2
        return [(low, mid), (mid, high)]
    if isinstance(value, list):
        return [[1], [2]]
    return []


def perturbed(root, name: str, option: str, base: dict[str, Any]):
    """The method built with ``option`` moved off its value in ``base``: the first candidate
    value that the options and the config accept."""
    options_cls = METHODS.get(name).Options
    current = options_cls.model_validate(
        {**METHODS.meta(name)["defaults"], **{k: v for k, v in base.items() if k != "name"}}
    )
    value = getattr(current, option)
    for candidate in _candidates(option, value):
        try:
            return candidate, build(root, {**base, option: candidate})
        except UsageError:
            continue
    raise AssertionError(f"no valid perturbation of {name}.{option} from {value!r}")


CASES = [(name, option) for name in METHODS.names() for option in numeric_options(name)]


@pytest.mark.parametrize(("name", "option"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_every_numeric_option_changes_the_run_as_the_reference_says(name, option, tiny_fmnist):
    context = CONTEXT.get((METHODS.get(name).__name__, option), {})
    base = section(name, **context)
    data, method = build(tiny_fmnist, base)
    seen, _ = walk(method, data)
    value, (data, method) = perturbed(tiny_fmnist, name, option, base)
    seen_p, want_p = walk(method, data)
    changed = differs(seen, seen_p)
    if option in NO_EFFECT:
        assert not changed, f"{name}.{option}={value!r} changed {changed}: {NO_EFFECT[option]}"
        return
    assert changed, f"{name}.{option}={value!r} changed nothing"
    assert_matches(seen_p, want_p, f"{name} with {option}={value!r}")
