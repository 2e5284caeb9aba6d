"""Image-quality metrics through torchmetrics, from local weights only: FID, KID, CLIP score, Inception score.

    from ldm.metrics import ImageMetrics
    metrics = ImageMetrics(["fid", "kid", "clip_score"], inception_weights="weights-inception-2015-12-05-6726825d.pth",
                           clip_model="clip-vit-large-patch14/")
    metrics.add_reference(real_uint8)            # B×3×H×W uint8, any size: the metric resizes
    metrics.update(fake_uint8, captions)         # as many batches as you like
    print(metrics.compute())                     # {"fid": ..., "kid_mean": ..., "kid_std": ..., "clip_score": ...}

The numbers are torchmetrics' own (`FrechetInceptionDistance`, `KernelInceptionDistance`, `InceptionScore`,
`CLIPScore`) on uint8 images at their stored size, resized by the metric itself: feature 2048 (and the
unbiased logits for IS) of torch-fidelity's InceptionV3 as torchmetrics wraps it (`NoTrainInceptionV3`,
`antialias` as torchmetrics' default). One Inception pass per batch feeds all three Inception metrics.
KID's subsets and IS's split order are drawn from a generator seeded `seed`, so a value repeats exactly.

Weights come only from paths: `inception_weights` is torch-fidelity's InceptionV3 file (read with
`torch.load(weights_only=True)`, or a `.safetensors`), `clip_model` a transformers CLIP folder
(`CLIPModel.save_pretrained` + processor files) or an OpenCLIP folder (`open_clip_config.json` and
`open_clip_pytorch_model.bin`, as MLPerf downloads ViT-H/14), or an OpenCLIP weights file with `clip_arch`.

Reference sets (`ImageSet`: a folder, WebDataset shards, or listed files) are read as uint8 RGB; other modes
are converted (as torch-fidelity does) and counted in `ImageSet.converted`. `ReferenceCache` keeps a set's
Inception features in one file keyed by the set's files (names, sizes, mtimes) and the weights' hash, so a
second evaluation against the same set reads none of its images.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

METRICS = ("fid", "kid", "clip_score", "inception_score")
INCEPTION_METRICS = ("fid", "kid", "inception_score")
REFERENCE_METRICS = ("fid", "kid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# torch-fidelity's InceptionV3 (feature_extractor_inceptionv3.URL_INCEPTION_V3), which torchmetrics loads.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
CLIP_HINT = (
    "a transformers CLIP folder (e.g. `hf download openai/clip-vit-large-patch14 --local-dir DIR`) or an OpenCLIP "
    "folder (e.g. `hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K open_clip_config.json "
    "open_clip_pytorch_model.bin --local-dir DIR`, MLPerf's)"
)


class MetricError(ValueError):
    """A metric setting, weights file or image set that cannot be used; the message is one line naming the fix."""


def check_metric_names(names: Sequence[str]) -> list[str]:
    names = [str(n) for n in names]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not names:
        raise MetricError(f"metrics= is empty; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def check_weight_paths(names: Sequence[str], inception_weights: str | None, clip_model: str | None) -> None:
    """Fail before any work when a metric's weights are not where the config says (paths only, no loading)."""
    inception = [n for n in names if n in INCEPTION_METRICS]
    if inception and (inception_weights is None or not Path(inception_weights).is_file()):
        where = " is not set" if inception_weights is None else f"={inception_weights} does not exist"
        raise MetricError(
            f"inception_weights{where}: {', '.join(inception)} need torch-fidelity's InceptionV3 weights, "
            f"which torchmetrics would download from {INCEPTION_URL}: download that file and give "
            f"inception_weights=PATH/{INCEPTION_FILE} (or leave {', '.join(inception)} out of metrics=)"
        )
    if "clip_score" in names and (clip_model is None or not Path(clip_model).exists()):
        where = " is not set" if clip_model is None else f"={clip_model} does not exist"
        raise MetricError(
            f"clip_model{where}: clip_score needs {CLIP_HINT}; give clip_model=DIR "
            "(or leave clip_score out of metrics=)"
        )


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached by file identity with the checkpoint hashes (ldm.pnginfo)."""
    from ldm.pnginfo import _sha256

    return _sha256(path)


# ---------------------------------------------------------------------------------------------- Inception


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def read_inception_state(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError (not a zip/pickle), safetensors errors
        raise MetricError(
            f"inception_weights={path} is not a weights file torch can read safely ({_one_line(err)}); "
            f"give torch-fidelity's {INCEPTION_FILE} ({INCEPTION_URL})"
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise MetricError(f"inception_weights={path} holds no state dict of tensors; give torch-fidelity's {INCEPTION_FILE}")
    return sd


def _architecture_error(path: str | Path, err: RuntimeError) -> MetricError:
    text = str(err)

    def count(label: str) -> int:
        found = re.search(label + r" in state_dict: (.*)", text)
        return len(re.findall(r'"[^"]+"', found.group(1))) if found else 0

    counts = ((count("Missing key\\(s\\)"), "missing keys"), (count("Unexpected key\\(s\\)"), "unexpected keys"),
              (text.count("size mismatch for"), "tensors of another shape"))
    parts = [f"{n} {what}" for n, what in counts if n]
    return MetricError(
        f"inception_weights={path} is not torch-fidelity's InceptionV3 ({', '.join(parts) or _one_line(err)}); "
        f"give {INCEPTION_FILE} ({INCEPTION_URL})"
    )


def load_inception(path: str | Path, antialias: bool = True) -> nn.Module:
    """torchmetrics' `NoTrainInceptionV3` (torch-fidelity's network) with weights from `path`, giving feature
    2048 and the unbiased logits. The file is read with `weights_only=True` here and handed on in memory, so
    torch-fidelity's own (unrestricted) `torch.load` only ever reads tensors we serialised."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    buffer = io.BytesIO()
    torch.save(read_inception_state(path), buffer)
    buffer.seek(0)
    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=buffer,  # type: ignore[arg-type]
            antialias=antialias,
        )
    except RuntimeError as err:
        if "state_dict" in str(err):
            raise _architecture_error(path, err) from None
        raise


class SharedInception(nn.Module):
    """One Inception pass per batch for all metrics: `features(x)` remembers the last input it saw."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self._last: tuple[Tensor, dict[str, Tensor]] | None = None

    def features(self, x: Tensor) -> dict[str, Tensor]:
        if self._last is None or self._last[0] is not x:
            with torch.no_grad():
                f2048, logits = self.network._torch_fidelity_forward(x)
            self._last = (x, {"2048": f2048.reshape(len(x), -1), "logits_unbiased": logits.reshape(len(x), -1)})
        return self._last[1]

    def forget(self) -> None:
        self._last = None


class InceptionFeature(nn.Module):
    """One output of a SharedInception, as the `feature=` module a torchmetrics metric takes."""

    def __init__(self, shared: SharedInception, name: str, num_features: int):
        super().__init__()
        self.shared, self.name, self.num_features = shared, name, num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.shared.features(x)[self.name]


# --------------------------------------------------------------------------------------------------- CLIP


class _CLIPFeatures(nn.Module):
    """A transformers CLIPModel as torchmetrics' CLIPScore calls it: get_*_features returning tensors (in
    transformers 5 they return a model output whose `pooler_output` holds the projected features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class _TruncatingProcessor:
    """A CLIPProcessor that truncates captions to the text tower's length, keeping the end token (torchmetrics
    would cut the ids after padding, dropping the end-of-text token CLIP pools at)."""

    def __init__(self, processor: Any, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, text: Any = None, images: Any = None, **kwargs: Any) -> Any:
        if text is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(text=text, images=images, **kwargs)


class _OpenCLIPFeatures(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = type("OpenCLIPConfig", (), {})()  # torchmetrics reads model.config.text_config if present

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.encode_text(input_ids)


class _OpenCLIPProcessor:
    """OpenCLIP's own preprocessing (its validation transform on PIL images) and tokenizer, as MLPerf scores."""

    def __init__(self, preprocess: Callable, tokenizer: Callable):
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(self, text: Any = None, images: Any = None, **_: Any) -> dict[str, Tensor]:
        if images is not None:
            pictures = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
            return {"pixel_values": torch.stack([self.preprocess(p) for p in pictures])}
        ids = self.tokenizer(list(text))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _weights_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def load_clip(path: str | Path, arch: str = "ViT-H-14") -> tuple[Callable[[], tuple[Any, Any]], Path]:
    """(factory for CLIPScore's `model_name_or_path`, weights file to hash) for a local CLIP."""
    path = Path(path)
    if path.is_file():  # an OpenCLIP weights file (MLPerf: open_clip_pytorch_model.bin of ViT-H-14)
        def open_clip_file() -> tuple[Any, Any]:
            import open_clip

            try:
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path))
            except RuntimeError as err:
                raise MetricError(f"clip_model={path} is not OpenCLIP {arch} weights ({_one_line(err)}); set clip_arch=") from None
            return _OpenCLIPFeatures(model.eval()), _OpenCLIPProcessor(preprocess, open_clip.get_tokenizer(arch))

        return open_clip_file, path
    if (path / "open_clip_config.json").is_file():
        weights = _weights_file(path, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        if weights is None:
            raise MetricError(f"clip_model={path} has open_clip_config.json but no open_clip_pytorch_model.bin; {CLIP_HINT}")

        def open_clip_folder() -> tuple[Any, Any]:
            import open_clip

            try:
                model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
            except RuntimeError as err:
                raise MetricError(f"clip_model={path}: its weights do not fit open_clip_config.json ({_one_line(err)})") from None
            return _OpenCLIPFeatures(model.eval()), _OpenCLIPProcessor(preprocess, open_clip.get_tokenizer(f"local-dir:{path}"))

        return open_clip_folder, weights
    config = path / "config.json"
    if not config.is_file():
        raise MetricError(f"clip_model={path} holds no config.json (transformers) or open_clip_config.json (OpenCLIP); {CLIP_HINT}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except ValueError as err:
        raise MetricError(f"clip_model={path}: config.json is not JSON ({err})") from None
    if model_type != "clip":
        raise MetricError(f"clip_model={path} is a {model_type!r} model, not CLIP (model_type 'clip'); {CLIP_HINT}")
    weights = _weights_file(path, ("model.safetensors", "pytorch_model.bin"))
    if weights is None:
        raise MetricError(f"clip_model={path} has no model.safetensors or pytorch_model.bin; {CLIP_HINT}")

    def transformers_folder() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights were not initialised" is reported below, in one line
        try:
            model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
            processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise MetricError(f"clip_model={path} does not load as a transformers CLIP ({_one_line(err)}); {CLIP_HINT}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        bad = [k for k in ("missing_keys", "mismatched_keys") if info.get(k)]
        if bad:
            raise MetricError(f"clip_model={path}: its weights do not fit its config.json ({', '.join(f'{len(info[k])} {k}' for k in bad)})")
        max_length = model.config.text_config.max_position_embeddings
        return _CLIPFeatures(model.eval()), _TruncatingProcessor(processor, max_length)

    return transformers_folder, weights


# ---------------------------------------------------------------------------------------------- Metrics


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded `seed` (KID's subsets, IS's shuffle), restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def frechet_distance(
    mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor, low_rank: Tensor | None = None
) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2), in float64, as torchmetrics' `_compute_fid` defines it.

    torchmetrics takes tr √(Σ1 Σ2) as the sum of the square roots of `eigvals(Σ1 @ Σ2)`, a general (non-symmetric)
    eigenproblem: 13 s for 2048 features on one CPU core. The same eigenvalues come from symmetric problems:
    with `low_rank` = B (d×n, Σ2 = B Bᵀ, e.g. n < d centred features / √(n − 1)), those of the n×n matrix Bᵀ Σ1 B
    (milliseconds); otherwise those of Σ1^½ Σ2 Σ1^½ (two symmetric eigendecompositions). Negative round-off
    eigenvalues count as 0, as the real part of torchmetrics' complex square root does."""
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    if low_rank is not None:
        b = low_rank.double()
        eigenvalues = torch.linalg.eigvalsh(b.t() @ cov1 @ b)
    else:
        lam, vec = torch.linalg.eigh(cov1)
        root = (vec * lam.clamp(min=0).sqrt()) @ vec.t()
        eigenvalues = torch.linalg.eigvalsh(root @ cov2 @ root)
    trace_sqrt = eigenvalues.clamp(min=0).sqrt().sum()
    return float((mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt)


def _centred_root(features: Tensor) -> Tensor:
    """B with B Bᵀ the sample covariance of `features` (n×d): (f − mean)ᵀ / √(n − 1)."""
    f = features.double()
    return (f - f.mean(dim=0, keepdim=True)).t() / (len(f) - 1) ** 0.5


def to_uint8_batch(images: Tensor | np.ndarray | Sequence[np.ndarray]) -> Tensor:
    """B×3×H×W uint8 from a uint8 tensor, an array B×H×W×3 or a list of H×W×3 arrays."""
    if isinstance(images, Tensor):
        batch = images
    elif isinstance(images, np.ndarray):
        batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    else:
        batch = torch.from_numpy(np.stack(list(images))).permute(0, 3, 1, 2)
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
        raise MetricError(f"images must be uint8 B×3×H×W, got {batch.dtype} {tuple(batch.shape)}")
    return batch.contiguous()


class ImageMetrics:
    """FID, KID, Inception score and CLIP score of generated images, by torchmetrics' metric classes.

    `add_reference` (or `set_reference_features`, e.g. from a ReferenceCache) gives the real images, `update`
    the generated ones (with their captions for CLIP score), `compute` the numbers. What the computation had to
    change (a KID subset larger than the sets, IS splits larger than the set) is said in `notes`.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        *,
        inception_weights: str | None = None,
        clip_model: str | None = None,
        clip_arch: str = "ViT-H-14",
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        inception_splits: int = 10,
        antialias: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance

        self.names = check_metric_names(metrics)
        check_weight_paths(self.names, inception_weights, clip_model)
        if kid_subsets < 1 or kid_subset_size < 2 or inception_splits < 1:
            raise MetricError("kid_subsets and inception_splits must be at least 1, kid_subset_size at least 2")
        self.device = torch.device(device)
        self.kid_subset_size, self.inception_splits, self.seed = kid_subset_size, inception_splits, seed
        self.notes: list[str] = []
        self.weights: dict[str, dict[str, str]] = {}
        self.settings = {
            "metrics": self.names, "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
            "inception_splits": inception_splits, "inception_antialias": antialias, "metric_seed": seed,
            "inception_feature": 2048,
        }
        self.shared: SharedInception | None = None
        self.fid = self.kid = self.inception_score = self.clip_score = None
        if any(n in INCEPTION_METRICS for n in self.names):
            self.shared = SharedInception(load_inception(inception_weights, antialias)).to(self.device)
            self.weights["inception"] = {"path": os.path.abspath(inception_weights), "sha256": file_sha256(inception_weights)}
        # The numbers are of the images given to this object: torchmetrics would otherwise gather every rank's
        # states at compute() whenever torch.distributed is initialised, and wait forever when only rank 0 scores
        # (ldm.lightning.evaluation gathers the images itself).
        local = {"sync_on_compute": False}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            if "fid" in self.names:
                self.fid = FrechetInceptionDistance(feature=InceptionFeature(self.shared, "2048", 2048), **local).to(self.device)
            if "kid" in self.names:
                self.kid = KernelInceptionDistance(
                    feature=InceptionFeature(self.shared, "2048", 2048), subsets=kid_subsets, subset_size=kid_subset_size,
                    **local,
                ).to(self.device)
            if "inception_score" in self.names:
                self.inception_score = InceptionScore(
                    feature=InceptionFeature(self.shared, "logits_unbiased", 1008), splits=inception_splits, **local
                ).to(self.device)
        if "clip_score" in self.names:
            from torchmetrics.multimodal.clip_score import CLIPScore

            factory, weights = load_clip(clip_model, clip_arch)
            self.clip_score = CLIPScore(model_name_or_path=factory, **local).to(self.device)
            self.weights["clip"] = {"path": os.path.abspath(clip_model), "sha256": file_sha256(weights)}
        self._reference: list[Tensor] = []
        self._fake: list[Tensor] | None = []
        self.num_images = 0

    @classmethod
    def from_config(cls, cfg: Any, device: str | torch.device = "cpu") -> ImageMetrics:
        """From a config node with `metrics`, `inception_weights`, `clip_model` and optionally `clip_arch`,
        `kid_subsets`, `kid_subset_size`, `inception_splits`, `inception_antialias`, `metric_seed`."""
        get = cfg.get
        return cls(
            list(get("metrics")), inception_weights=get("inception_weights"), clip_model=get("clip_model"),
            clip_arch=get("clip_arch", "ViT-H-14"), kid_subsets=int(get("kid_subsets", 100)),
            kid_subset_size=int(get("kid_subset_size", 1000)), inception_splits=int(get("inception_splits", 10)),
            antialias=bool(get("inception_antialias", True)), seed=int(get("metric_seed", 0)), device=device,
        )

    def to(self, device: str | torch.device) -> ImageMetrics:
        """Move the networks and states (e.g. built on the CPU to check the weights, used on the GPU)."""
        self.device = torch.device(device)
        for module in (self.shared, self.fid, self.kid, self.inception_score, self.clip_score):
            if module is not None:
                module.to(self.device)
        return self

    @property
    def needs_reference(self) -> bool:
        return self.fid is not None or self.kid is not None

    @property
    def needs_captions(self) -> bool:
        return self.clip_score is not None

    def reference_features(self, images: Tensor) -> Tensor:
        """Feature 2048 of a uint8 batch: what a reference set contributes (and what ReferenceCache keeps)."""
        x = to_uint8_batch(images).to(self.device)
        features = self.shared.features(x)["2048"].float().cpu()
        self.shared.forget()
        return features

    def add_reference(self, images: Tensor) -> None:
        if self.needs_reference:
            self._reference.append(self.reference_features(images))

    def set_reference_features(self, features: Tensor) -> None:
        self._reference = [features.float().cpu()]

    @property
    def num_reference(self) -> int:
        return sum(len(f) for f in self._reference)

    def all_reference_features(self) -> Tensor:
        return torch.cat(self._reference) if self._reference else torch.zeros(0, 2048)

    @torch.no_grad()
    def update(self, images: Tensor, captions: Sequence[str] | None = None) -> None:
        x = to_uint8_batch(images).to(self.device)
        if self.fid is not None and self._fake is not None:  # a small set's features: FID's fast square root
            self._fake.append(self.shared.features(x)["2048"].double().cpu())
            if sum(len(f) for f in self._fake) > 2048:
                self._fake = None
        for metric in (self.fid, self.kid):
            if metric is not None:
                metric.update(x, real=False)
        if self.inception_score is not None:
            self.inception_score.update(x)
        if self.clip_score is not None:
            if captions is None or len(captions) != len(x):
                raise MetricError(f"clip_score needs one caption per image: {len(x)} images, "
                                  f"{'no' if captions is None else len(captions)} captions")
            self.clip_score.update(x, list(captions))
        if self.shared is not None:
            self.shared.forget()
        self.num_images += len(x)

    def _load_reference_into_metrics(self) -> None:
        real = self.all_reference_features().to(self.device)
        if self.fid is not None:  # FrechetInceptionDistance.update(real=True)'s states, from the features
            f = real.double()
            self.fid.real_features_sum = f.sum(dim=0)
            self.fid.real_features_cov_sum = f.t().mm(f)
            self.fid.real_features_num_samples = torch.tensor(len(f), device=self.device)
        if self.kid is not None:
            self.kid.real_features = [real]

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """The configured metrics as plain floats: fid, kid_mean, kid_std, clip_score, inception_score_mean/std."""
        self.notes = []
        out: dict[str, float] = {}
        if self.needs_reference:
            if self.num_reference < 2 or self.num_images < 2:
                raise MetricError(
                    f"fid and kid need at least 2 images on each side: {self.num_reference} reference, "
                    f"{self.num_images} generated"
                )
            self._load_reference_into_metrics()
        if self.fid is not None:
            out["fid"] = self._fid()
        if self.kid is not None:
            smallest = min(self.num_reference, self.num_images)
            self.kid.subset_size = min(self.kid_subset_size, smallest)
            if self.kid.subset_size < self.kid_subset_size:
                self.notes.append(
                    f"kid: subset size {self.kid_subset_size} is more than the {smallest} "
                    f"{'reference' if self.num_reference == smallest else 'generated'} images: "
                    f"shrunk to {self.kid.subset_size}"
                )
            with _seeded(self.seed):
                mean, std = self.kid.compute()
            out["kid_mean"], out["kid_std"] = float(mean), float(std)
        if self.clip_score is not None:
            out["clip_score"] = float(self.clip_score.compute())
        if self.inception_score is not None:
            self.inception_score.splits = min(self.inception_splits, self.num_images)
            if self.inception_score.splits < self.inception_splits:
                self.notes.append(
                    f"inception_score: {self.num_images} images are fewer than inception_splits="
                    f"{self.inception_splits}: {self.inception_score.splits} splits"
                )
            with _seeded(self.seed):
                mean, std = self.inception_score.compute()
            out["inception_score_mean"], out["inception_score_std"] = float(mean), float(std)
        self.settings["kid_subset_size_used"] = self.kid.subset_size if self.kid is not None else None
        self.settings["inception_splits_used"] = self.inception_score.splits if self.inception_score is not None else None
        return out

    def _fid(self) -> float:
        """FrechetInceptionDistance.compute's value from its states (means and covariances exactly as it
        forms them), by `frechet_distance`'s symmetric eigenproblems."""
        fid = self.fid
        means, covs = [], []
        for side in ("real", "fake"):
            total, cov_sum = getattr(fid, f"{side}_features_sum"), getattr(fid, f"{side}_features_cov_sum")
            n = getattr(fid, f"{side}_features_num_samples")
            mean = (total / n).unsqueeze(0)
            means.append(mean.squeeze(0).cpu())
            covs.append(((cov_sum - n * mean.t().mm(mean)) / (n - 1)).cpu())
        low_rank = None
        if self._fake is not None:
            low_rank = _centred_root(torch.cat(self._fake))
        elif self.num_reference <= 2048:
            low_rank = _centred_root(self.all_reference_features())
            means, covs = means[::-1], covs[::-1]  # eig(Σ_fake Σ_real) = eig(Σ_real Σ_fake)
        return frechet_distance(means[0], covs[0], means[1], covs[1], low_rank)

    def reset(self, keep_reference: bool = True) -> None:
        """Forget the generated images (and the reference unless `keep_reference`), e.g. between evaluations."""
        for metric in (self.fid, self.kid, self.inception_score, self.clip_score):
            if metric is not None:
                metric.reset()
        self.num_images = 0
        self._fake = []
        if not keep_reference:
            self._reference = []


# ------------------------------------------------------------------------------------------- Image sets


@dataclass
class ImageItem:
    """One image of a set: a file, or a member of a tar shard; with its caption when the set has one."""

    name: str
    path: str | None = None
    shard: str | None = None
    member: str | None = None
    caption: str | None = None


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def looks_like_shards(spec: str) -> bool:
    return (
        spec.endswith(".tar") or "{" in spec or any(c in spec for c in "*?[")
        or (os.path.isdir(spec) and any(p.suffix == ".tar" for p in Path(spec).iterdir())
            and not any(_is_image_name(p.name) for p in Path(spec).iterdir()))
    )


def expand_shards(spec: str) -> list[str]:
    import glob

    import braceexpand

    urls: list[str] = []
    for url in braceexpand.braceexpand(spec):
        if any(c in url for c in "*?["):
            urls += sorted(glob.glob(url))
        elif os.path.isdir(url):
            urls += sorted(str(p) for p in Path(url).glob("*.tar"))
        elif os.path.isfile(url):
            urls.append(url)
        else:
            raise MetricError(f"shard {url} (of {spec}) does not exist")
    if not urls:
        raise MetricError(f"{spec} matches no .tar shards")
    return urls


def _caption_of(members: dict[str, bytes], caption_key: str) -> str | None:
    extension, _, json_path = caption_key.partition(".")
    raw = members.get(extension)
    if raw is None:
        return None
    if not json_path:
        return raw.decode("utf-8", errors="replace").strip() or None
    try:
        value: Any = json.loads(raw)
    except ValueError:
        return None
    for part in json_path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value.strip() or None if isinstance(value, str) else None


def iter_shard_samples(
    urls: Sequence[str], caption_key: str = "txt", read_images: bool = True
) -> Iterator[tuple[str, str, str, str | None, bytes | None]]:
    """(shard, sample key, image member, caption, image bytes) per sample holding an image, in shard order.
    A sample is the tar members sharing a key (WebDataset's rule: the name up to the first dot of its base
    name). With `read_images=False` image bytes are skipped (None), only captions are read."""
    caption_ext = caption_key.partition(".")[0]
    for url in urls:
        try:
            with tarfile.open(url, "r:*") as tar:
                sample: dict[str, Any] = {"key": None}
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, _, base = info.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    if key != sample["key"]:
                        yield from _finished(url, sample, caption_key)
                        sample = {"key": key, "members": {}, "image": None, "bytes": None}
                    ext = ext.lower()
                    if _is_image_name(base) and sample["image"] is None and "." not in ext:
                        sample["image"] = info.name
                        sample["bytes"] = tar.extractfile(info).read() if read_images else None
                    elif ext == caption_ext:
                        sample["members"][ext] = tar.extractfile(info).read()
                yield from _finished(url, sample, caption_key)
        except (tarfile.TarError, OSError) as err:
            raise MetricError(f"shard {url} cannot be read as a tar file ({_one_line(err)})") from None


def _finished(url: str, sample: dict[str, Any], caption_key: str) -> Iterator[tuple[str, str, str, str | None, bytes | None]]:
    if sample["key"] is not None and sample["image"] is not None:
        yield url, sample["key"], sample["image"], _caption_of(sample["members"], caption_key), sample["bytes"]


@dataclass
class ImageSet:
    """Images to score or to take as the reference: files on disk or samples of tar shards."""

    items: list[ImageItem]
    source: str
    shards: list[str] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)

    @classmethod
    def from_folder(cls, folder: str | Path, what: str = "reference") -> ImageSet:
        folder = Path(folder)
        if not folder.is_dir():
            raise MetricError(f"{what}={folder} is not a folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_image_name(p.name))
        if not files:
            raise MetricError(f"{what}={folder} holds no images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
        return cls([ImageItem(p.relative_to(folder).as_posix(), path=str(p)) for p in files], str(folder))

    @classmethod
    def from_shards(cls, spec: str, caption_key: str = "txt", what: str = "reference") -> ImageSet:
        urls = expand_shards(spec)
        items = [
            ImageItem(f"{Path(url).name}:{key}", shard=url, member=member, caption=caption)
            for url, key, member, caption, _ in iter_shard_samples(urls, caption_key, read_images=False)
        ]
        if not items:
            raise MetricError(f"{what}={spec} holds no images in its {len(urls)} shard(s)")
        return cls(items, spec, shards=urls)

    @classmethod
    def from_spec(cls, spec: str, caption_key: str = "txt", what: str = "reference") -> ImageSet:
        if looks_like_shards(spec):
            return cls.from_shards(spec, caption_key, what)
        if not os.path.exists(spec):
            raise MetricError(f"{what}={spec} does not exist")
        return cls.from_folder(spec, what)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], source: str) -> ImageSet:
        missing = [str(p) for p in paths if not os.path.isfile(p)]
        if missing:
            raise MetricError(f"{source}: {len(missing)} image(s) not found, e.g. {missing[0]}")
        return cls([ImageItem(str(p), path=str(p)) for p in paths], source)

    def __len__(self) -> int:
        return len(self.items)

    def identity(self) -> str:
        """sha256 over what the set is made of: each file's (or shard's) name, size and mtime; cheap (stat only)."""
        digest = hashlib.sha256()
        if self.shards:
            entries = [(os.path.abspath(u), *_stat(u)) for u in self.shards] + [("samples", len(self.items))]
        else:
            entries = [(os.path.abspath(i.path), *_stat(i.path)) for i in self.items]
        for entry in entries:
            digest.update(("\0".join(map(str, entry)) + "\n").encode())
        return digest.hexdigest()

    def _decode(self, data: bytes | str, name: str) -> np.ndarray:
        from ldm.data.transforms import exif_orientation, open_picture, to_rgb

        try:  # as the training loaders read a picture: upright by EXIF, transparency on white
            with open_picture(data) as image:
                if image.mode != "RGB":
                    self.converted[image.mode] += 1
                return np.asarray(to_rgb(image, exif_orientation(image)))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise MetricError(f"{self.source}: {name} is not an image PIL can read ({_one_line(err)})") from None

    def iter_arrays(self) -> Iterator[tuple[ImageItem, np.ndarray]]:
        """Each image as an H×W×3 uint8 array, in set order."""
        if self.shards:
            by_member = {(i.shard, i.member): i for i in self.items}
            for url, _, member, _, data in iter_shard_samples(self.shards, "txt", read_images=True):
                item = by_member.get((url, member))
                if item is not None:
                    yield item, self._decode(data, item.name)
        else:
            for item in self.items:
                yield item, self._decode(item.path, item.name)

    def iter_batches(self, batch_size: int, progress: str | None = None) -> Iterator[tuple[list[ImageItem], Tensor]]:
        """(items, B×3×H×W uint8) of up to `batch_size` consecutive images of one size (a size change starts a
        batch: the metric resizes each image from its own stored size)."""
        bar = None
        if progress is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.items), desc=progress, unit="img", leave=False)
        items: list[ImageItem] = []
        arrays: list[np.ndarray] = []
        try:
            for item, array in self.iter_arrays():
                if arrays and (array.shape != arrays[0].shape or len(arrays) == batch_size):
                    yield items, to_uint8_batch(arrays)
                    items, arrays = [], []
                items.append(item)
                arrays.append(array)
                if bar is not None:
                    bar.update()
            if arrays:
                yield items, to_uint8_batch(arrays)
        finally:
            if bar is not None:
                bar.close()

    def conversion_note(self, what: str) -> str | None:
        if not self.converted:
            return None
        modes = ", ".join(f"{n} {mode}" for mode, n in sorted(self.converted.items()))
        return f"{what}: {sum(self.converted.values())} of {len(self)} images converted to RGB ({modes})"


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------------------------- Reference cache


def default_cache_dir() -> Path:
    """Beside the checkpoint hash cache: `$LDM_CACHE_DIR/reference-stats`, else ~/.cache/ldm/reference-stats."""
    from ldm.pnginfo import hash_cache_path

    return hash_cache_path().parent / "reference-stats"


class ReferenceCache:
    """Inception features of reference sets, one `.safetensors` file per (set, weights, resize) key."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()

    @staticmethod
    def key(images: ImageSet, metrics: ImageMetrics) -> str:
        parts = {
            "set": images.identity(),
            "inception_sha256": metrics.weights["inception"]["sha256"],
            "antialias": metrics.settings["inception_antialias"],
            "feature": 2048,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> tuple[Tensor, dict[str, str]] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("features"), dict(f.metadata() or {})
        except (SafetensorError, OSError, KeyError):
            return None  # a damaged cache file costs one recomputation

    def save(self, key: str, features: Tensor, metadata: dict[str, str]) -> Path | None:
        from safetensors.torch import save_file

        from ldm.checkpoint import atomic_write

        path = self.path(key)
        try:
            atomic_write(path, lambda tmp: save_file({"features": features.contiguous()}, str(tmp), metadata=metadata))
        except OSError:
            return None  # an unwritable cache only costs the next run a read of the reference
        return path


def reference_features(
    images: ImageSet, metrics: ImageMetrics, cache: ReferenceCache | None, batch_size: int = 32,
    progress: str | None = "reference features",
) -> tuple[Tensor, bool, list[str]]:
    """(features N×2048, whether they came from the cache, notes) of a reference set."""
    key = ReferenceCache.key(images, metrics) if cache is not None else None
    if cache is not None:
        hit = cache.load(key)
        if hit is not None and len(hit[0]) == len(images):
            features, meta = hit
            return features, True, json.loads(meta.get("notes", "[]"))
    chunks = [metrics.reference_features(batch) for _, batch in images.iter_batches(batch_size, progress)]
    features = torch.cat(chunks)
    notes = [n for n in [images.conversion_note("reference")] if n]
    if cache is not None:
        cache.save(key, features, {
            "source": images.source, "num_images": str(len(images)), "notes": json.dumps(notes),
            "inception_sha256": metrics.weights["inception"]["sha256"],
            "antialias": str(metrics.settings["inception_antialias"]),
        })
    return features, False, notes
