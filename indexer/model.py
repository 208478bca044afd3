"""Finding and loading the Freepik checkpoint (TimmWrapper layout) into plain timm, with its `ModelIdentity`."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.errors import CheckpointMismatch, ModelNotFound
from search.policy import ModelIdentity
from search.settings import DEFAULT_ARCH, DEFAULT_MODEL, LEVELS

if TYPE_CHECKING:
    import torch

# torch, timm and safetensors are imported where they are used: finding the checkpoint (and failing with the download
# hint when it is missing) needs none of them, so a missing model is reported before seconds of imports.

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# transformers 5 writes TimmWrapper keys with this prefix; 4.x wrote bare timm keys.
KEY_PREFIX = "timm_model."

_HOW_TO_GET = (
    "Download it with `hf download {repo}` (it lands in the Hugging Face cache), "
    "or pass `--model DIR` with a directory holding config.json and model.safetensors "
    "(or `--model FILE.safetensors --arch ARCH`)."
)


@dataclass
class CheckpointFiles:
    config: dict[str, Any]
    weights: Path
    source: str


@dataclass
class LoadedModel:
    model: torch.nn.Module
    identity: ModelIdentity
    data_config: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the checkpoint's config.json (keys the export cache)

    def transform(self) -> Any:
        return eval_transform(self.data_config)


def eval_transform(data_config: dict[str, Any]) -> Any:
    """The model's eval transform from its data config (timm `create_transform`): what every decoder, the extractor
    and the int8 calibration apply, so that one preprocessing serves them all."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointMismatch(f"{path}: cannot read the checkpoint config ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointMismatch(f"{path}: config.json is not a JSON object")
    return cfg


def resolve_checkpoint(model: str = DEFAULT_MODEL, arch: str | None = None) -> CheckpointFiles:
    """`model` is a local directory, a .safetensors file (with `arch`), or a Hugging Face repo id in the local cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        weights, config = p / WEIGHTS_FILE, p / CONFIG_FILE
        if not weights.is_file():
            raise ModelNotFound(f"{p} has no {WEIGHTS_FILE}. " + _HOW_TO_GET.format(repo=DEFAULT_MODEL))
        cfg = _read_config(config) if config.is_file() else {}
        if arch:
            cfg["architecture"] = arch
        if "architecture" not in cfg:
            raise ModelNotFound(f"{p} has no {CONFIG_FILE} naming the architecture; pass --arch ARCH")
        return CheckpointFiles(cfg, weights, str(p))
    if p.suffix == ".safetensors" or p.is_file():
        if not p.is_file():
            raise ModelNotFound(f"no weights file at {p}. " + _HOW_TO_GET.format(repo=DEFAULT_MODEL))
        sibling = p.parent / CONFIG_FILE
        cfg = _read_config(sibling) if sibling.is_file() else {}
        if arch:
            cfg["architecture"] = arch
        if "architecture" not in cfg:
            raise ModelNotFound(f"{p} is a bare weights file: pass --arch (for Freepik: {DEFAULT_ARCH})")
        return CheckpointFiles(cfg, p, str(p))
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelNotFound(
            f"--model {model!r} is neither a local directory, a .safetensors file nor a Hugging Face repo id. "
            + _HOW_TO_GET.format(repo=DEFAULT_MODEL)
        )
    return _from_hub(model, arch)


#: Seconds the one reachability probe of the Hub may take before a missing model is reported (no retries).
HUB_PROBE_TIMEOUT = 1.0


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _from_hub(repo: str, arch: str | None) -> CheckpointFiles:
    """The local Hugging Face cache first (no network at all); then, unless offline, one short probe of the Hub (no
    retry loop: an unreachable Hub fails in seconds with the download hint) before downloading."""
    import httpx
    from huggingface_hub import hf_hub_download, hf_hub_url, try_to_load_from_cache

    cached = [try_to_load_from_cache(repo, name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    if all(isinstance(c, str) for c in cached):
        cfg_path, w_path = str(cached[0]), str(cached[1])
    else:
        if _offline():
            raise ModelNotFound(
                f"the weights of {repo} are not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                + _HOW_TO_GET.format(repo=repo)
            )
        try:  # one request with a hard deadline (huggingface_hub's own metadata call retries on timeouts)
            probe = httpx.head(hf_hub_url(repo, CONFIG_FILE), timeout=HUB_PROBE_TIMEOUT, follow_redirects=False)
            if probe.status_code >= 500:  # the Hub (or a proxy) is down: a download would only retry
                raise ConnectionError(f"the Hub answered HTTP {probe.status_code}")
        except Exception as e:  # unreachable, refused, DNS, timed out: not downloadable from here, now
            raise ModelNotFound(
                f"the weights of {repo} are not in the local Hugging Face cache and the Hub cannot be reached "
                f"({type(e).__name__}: {str(e)[:160]}). " + _HOW_TO_GET.format(repo=repo)
            ) from None
        try:
            cfg_path = hf_hub_download(repo, CONFIG_FILE, etag_timeout=HUB_PROBE_TIMEOUT)
            w_path = hf_hub_download(repo, WEIGHTS_FILE, etag_timeout=HUB_PROBE_TIMEOUT)
        except Exception as e:  # network errors, HTTP errors, a full disk
            raise ModelNotFound(
                f"the weights of {repo} are not in the local Hugging Face cache and the download failed "
                f"({type(e).__name__}: {str(e)[:160]}). " + _HOW_TO_GET.format(repo=repo)
            ) from None
    cfg = _read_config(Path(cfg_path))
    if arch:
        cfg["architecture"] = arch
    return CheckpointFiles(cfg, Path(w_path), repo)


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file with the TimmWrapper `timm_model.` prefix removed (both layouts accepted)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            prefixed = [k for k in keys if k.startswith(KEY_PREFIX)]
            if prefixed and len(prefixed) != len(keys):
                odd = sorted(set(keys) - set(prefixed))[:3]
                raise CheckpointMismatch(f"{weights}: mixes prefixed and bare keys (e.g. {odd})")
            strip = len(KEY_PREFIX) if prefixed else 0
            return {k[strip:]: f.get_tensor(k) for k in keys}
    except CheckpointMismatch:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CheckpointMismatch(f"{weights}: not a readable safetensors file ({e})") from e


def _label_names(cfg: dict[str, Any], num_classes: int) -> tuple[str, ...]:
    names = cfg.get("label_names")
    if names is None and isinstance(cfg.get("id2label"), dict):
        names = [cfg["id2label"][k] for k in sorted(cfg["id2label"], key=int)]
    if names is None:
        names = list(LEVELS) if num_classes == len(LEVELS) else [str(i) for i in range(num_classes)]
    return tuple(str(n) for n in names)


def load_model(model: str = DEFAULT_MODEL, arch: str | None = None) -> LoadedModel:
    """Build the timm model named by the checkpoint and load its weights strictly. Eval mode, fp32, on the CPU."""
    import timm
    from timm.data import resolve_data_config

    files = resolve_checkpoint(model, arch)
    cfg = files.config
    architecture = str(cfg["architecture"])
    state = read_state_dict(files.weights)
    num_classes = int(cfg.get("num_classes") or cfg.get("num_labels") or len(cfg.get("label_names") or LEVELS))
    head = state.get("head.weight")
    if head is not None and head.shape[0] != num_classes:
        raise CheckpointMismatch(
            f"{files.weights}: the classifier head 'head.weight' has {head.shape[0]} classes but "
            f"{CONFIG_FILE} says num_classes={num_classes}; this is not a {num_classes}-class checkpoint"
        )
    model_args = dict(cfg.get("model_args") or {})
    try:
        net = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
    except RuntimeError as e:
        raise CheckpointMismatch(f"{files.source}: timm {timm.__version__} cannot build {architecture!r} ({e})") from e
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing tensor(s) {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected tensor(s) {unexpected[:5]}"
                + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            )
        raise CheckpointMismatch(f"{files.weights} does not fit {architecture}: " + "; ".join(parts))
    bad_shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad_shapes:
        raise CheckpointMismatch(f"{files.weights} does not fit {architecture}: " + "; ".join(bad_shapes[:5]))
    net.load_state_dict(state, strict=True)
    net.eval()
    pretrained_cfg = cfg.get("pretrained_cfg") or {}
    # The checkpoint's own preprocessing first (what transformers' TimmWrapperImageProcessor uses), then the model's.
    data_config = resolve_data_config(dict(pretrained_cfg), model=net, verbose=False)
    identity = ModelIdentity(
        architecture=architecture,
        weights_sha256=sha256_file(files.weights),
        preprocessing=json.loads(json.dumps(data_config)),
        embedding_dim=int(getattr(net, "num_features")),  # noqa: B009  (timm models set it; nn.Module typing does not know)
        num_classes=num_classes,
        label_names=_label_names(cfg, num_classes),
        source=files.source,
    )
    return LoadedModel(net, identity, data_config, cfg)
