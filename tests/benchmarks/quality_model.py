"""The quality benchmark's model and judge: a tiny SD-style UNet of the host's own class, trained on
scikit-learn's bundled digits, loaded as a real ComfyUI MODEL, and a small CNN classifier.

Shared by ``scripts/train_quality_model.py`` (which trains and writes both) and
``tests/benchmarks/quality.py`` (which loads them). Needs the ComfyUI host on ``sys.path``.

- Data: the 1,797 real 8x8 digits (0..16), bilinearly upsampled to 16x16 and mapped to [-1, 1];
  one channel, used directly as the "latent" (latent format: 1 channel, scale 1, no VAE).
- Diffusion model: ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` inside the host's
  ``BaseModel`` (eps prediction, the host's SD1.x discrete schedule: betas linear in sqrt space from
  0.00085 to 0.012, 1000 steps), model config a subclass of the host's ``SD15``. Channels 32-64-64,
  one res block per level, a SpatialTransformer (self-attention ``attn1`` + cross-attention ``attn2``)
  at 8x8 and 4x4 on both paths and in the middle block, 32 channels per head.
- Conditioning: the class is 4 learned tokens of width 64 (class 10 is the null class, used for the
  negative prompt: 10 % null dropout in training makes CFG possible), given to the sampler as the
  host's CONDITIONING ``[[tokens (B, 4, 64), {}]]``.
- Judge: a 3-conv CNN on the same 16x16 images; its 64-wide penultimate layer is the feature space of
  FID and k-NN precision / recall.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent / "quality_assets"
UNET_PATH = ASSETS / "digits_unet.safetensors"
JUDGE_PATH = ASSETS / "digits_judge.safetensors"
HASHES_PATH = ASSETS / "SHA256SUMS"

RESOLUTION = 16
NUM_CLASSES = 10
NULL_CLASS = 10
CLASS_TOKENS = 4
CONTEXT_DIM = 64

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": RESOLUTION,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 1,
    "out_channels": 1,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2],
    "transformer_depth": [0, 1, 1],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, 16, 16) float32 in [-1, 1] and their labels (N,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return images * 2.0 - 1.0, torch.tensor(digits.target, dtype=torch.int64)


def _model_config():
    import comfy.latent_formats
    import comfy.supported_models

    class DigitsLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        scale_factor = 1.0

    class DigitsSD(comfy.supported_models.SD15):
        """SD1.x's model config (eps, SD1.x schedule), one-channel pixel "latents", 32 channels per head."""

        unet_extra_config = {"num_heads": -1, "num_head_channels": 32}
        latent_format = DigitsLatent
        memory_usage_factor = 1.0

    config = DigitsSD(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    return config


def build_base_model():
    """The host's BaseModel (eps) around a fresh UNetModel of UNET_CONFIG, fp32 on the CPU."""
    import comfy.model_base

    config = _model_config()
    return comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))


class Judge(torch.nn.Module):
    """Small CNN classifier; ``features`` is the 64-wide penultimate layer (FID, precision, recall)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recorded_hashes() -> dict[str, str]:
    """{file name: sha256} from quality_assets/SHA256SUMS (sha256sum's format)."""
    hashes = {}
    for line in HASHES_PATH.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            hashes[name.lstrip("*")] = digest
    return hashes


def load_unet(path: Path = UNET_PATH):
    """(ModelPatcher, class_tokens (11, 4, 64)): the trained UNet as a ComfyUI MODEL, fp32 on the CPU."""
    import comfy.model_management
    import comfy.model_patcher
    from safetensors.torch import load_file

    state = load_file(str(path))
    tokens = state.pop("class_tokens").float()
    model = build_base_model()
    missing, unexpected = model.diffusion_model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    assert not missing and not unexpected
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=torch.device("cpu")
    )
    return patcher, tokens


def load_judge(path: Path = JUDGE_PATH) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return judge.eval()


def conditioning(tokens: torch.Tensor, labels: torch.Tensor):
    """(positive, negative) CONDITIONING for a batch: each row's class tokens, and the null tokens."""
    positive = tokens[labels]
    negative = tokens[torch.full_like(labels, NULL_CLASS)]
    return [[positive, {}]], [[negative, {}]]


def metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: (json.loads(v) if v.startswith("{") else v) for k, v in (f.metadata() or {}).items()}
