"""Typed configs for the on-device reranker, its runtime and its update encoders.

Sizes live here (not in code) so the strategies in ``tandem/strategies`` can
configure a fleet without touching the modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

#: Context features per candidate, in the order ``features.candidate_features`` writes them.
CTX_FEATURES: Final[tuple[str, ...]] = (
    "in_seq",  # 1 when the candidate is in the recent behaviour sequence
    "log_count",  # log1p(times engaged recently)
    "freshness",  # 1 - log1p(seconds since last engagement) / log1p(horizon); 0 when never
    "log_dwell",  # log1p(last dwell s) / log1p(3600)
    "is_live",  # 1 when live now (or availability unknown)
    "rank_frac",  # position in the cloud list / K (injected items get 1)
    "log_impr",  # log1p(times shown on this device without engagement)
    "neg",  # log1p(skips + deletes)
)
#: Features per behaviour-sequence step.
SEQ_FEATURES: Final[tuple[str, ...]] = ("log_dwell", "age", "is_live_kind")

#: Prior weights of the linear head over [ctx..., cloud_z, max_sim]; an untrained
#: reranker therefore ranks by the cloud score plus sensible real-time nudges
#: (EdgeRec-style), and training only has to learn corrections.
DEFAULT_PRIOR: Final[tuple[float, ...]] = (0.3, 0.2, 0.5, 0.4, 0.5, -0.5, -0.3, -3.0, 1.0, 0.8)


@dataclass(frozen=True)
class RerankerConfig:
    """Shape of the on-device reranker.

    Args:
        emb_dim: item embedding width sent by the cloud (``Candidates.emb_q.shape[1]``).
        seq_len: behaviour-sequence length the model attends over.
        attn_dim: query/key width of the target attention.
        hidden: width of the scoring MLP.
        prior: initial weights of the linear prior head (see ``DEFAULT_PRIOR``).
    """

    emb_dim: int = 32
    seq_len: int = 20
    attn_dim: int = 16
    hidden: int = 32
    prior: tuple[float, ...] = DEFAULT_PRIOR

    @property
    def ctx_dim(self) -> int:
        return len(CTX_FEATURES)

    @property
    def seq_feat_dim(self) -> int:
        return len(SEQ_FEATURES)

    @property
    def patch_dim(self) -> int:
        """Per-user patch: a query offset (attn_dim) plus a taste vector (emb_dim)."""
        return self.attn_dim + self.emb_dim


@dataclass(frozen=True)
class PersonalizeConfig:
    """Bounded on-device fine-tuning of the per-user patch.

    Args:
        lr: Adam learning rate on the patch.
        max_steps_per_session: hard cap on steps between two sessions (battery).
        l2: weight decay pulling the patch toward zero (the shared model).
        max_norm: the patch is projected back to this L2 norm after each step.
        batch_groups: example groups per step (sampled from the buffer).
        holdout_groups: the newest this-many groups are not trained on but decide whether the
            new patch is kept (it must lower their loss); 0 = always keep it.
    """

    lr: float = 0.05
    max_steps_per_session: int = 50
    l2: float = 1e-3
    max_norm: float = 5.0
    batch_groups: int = 16
    holdout_groups: int = 0


@dataclass(frozen=True)
class FeatureEncoderConfig:
    """Feature-family update (user-interest vector); optional local DP.

    Args:
        noise_multiplier: z; 0 sends the vector as is. With z > 0 the vector is clipped to
            ``clip_norm`` and gets Gaussian noise ``z * clip_norm`` (accounted like parameter updates).
        clip_norm: L2 bound on the interest vector before noise.
    """

    noise_multiplier: float = 0.0
    clip_norm: float = 1.0


@dataclass(frozen=True)
class ParameterEncoderConfig:
    """Parameter-family update: FedSGD-style delta of shared weights and touched rows.

    Args:
        clip_norm: C, the L2 bound on the raw (pre-noise) update = the DP sensitivity.
        noise_multiplier: z; Gaussian noise std is ``z * C`` on every coordinate.
        top_k: model coordinates sent per update (error feedback keeps the rest).
        max_rows: embedding rows sent per update (largest norms first).
        local_lr: the delta is ``-local_lr * gradient``.
        residual_max_norm: the error-feedback residual is clipped to this norm.
        tail_sigmas: the sent-norm bound allows ``sigma * (sqrt(n) + tail_sigmas)`` of noise.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    top_k: int = 256
    max_rows: int = 16
    local_lr: float = 1.0
    residual_max_norm: float = 10.0
    tail_sigmas: float = 6.0

    def send_bound(self, n_params: int, emb_dim: int) -> float:
        """Hard L2 bound on what is sent (the verifier's ``norm_exceeded`` check)."""
        n = self.top_k + self.max_rows * emb_dim
        sigma = self.noise_multiplier * self.clip_norm
        return float(self.clip_norm + sigma * (n**0.5 + self.tail_sigmas))


@dataclass(frozen=True)
class DataEncoderConfig:
    """Data-family update: a few hard examples, only with consent.

    Args:
        consent: the user's opt-in; without it nothing is sent.
        max_examples: cap on examples per envelope.
        sample_rate: probability each candidate example is considered (before hardness ranking).
    """

    consent: bool = False
    max_examples: int = 32
    sample_rate: float = 1.0


@dataclass(frozen=True)
class PrivacyConfig:
    """Per-device privacy budget for noisy (parameter) updates.

    Args:
        delta: target delta of the reported (epsilon, delta).
        max_epsilon: refuse to send once epsilon would exceed this; None disables the check.
    """

    delta: float = 1e-5
    max_epsilon: float | None = 10.0


@dataclass(frozen=True)
class DeviceConfig:
    """Runtime of one simulated device.

    Args:
        history_len: behaviour events kept (the model sees the last ``reranker.seq_len``).
        cache_items: item embeddings cached (LRU) for the sequence and on-device recall.
        k_exposures: re-score after this many impressions without an engagement.
        skip_dwell_s: a WATCH/LIVE_LEAVE shorter than this counts as a skip.
        hide_deleted: never rank items the user deleted.
        exclude_consumed: drop items already engaged with (feeds) instead of boosting repeats (live).
        inject_live_recall: add recently engaged items that are live now but absent from the cloud list.
        max_injected: at most this many injected items per ranking.
        inject_cloud_z: cloud score (z-units) given to injected items (0: neutral; -1 before, which sank
            a favourite that just went live below most of the list).
        recency_horizon_s: ``freshness`` reaches 0 at this age.
        interest_half_life_s: half-life of engagement weight in the user-interest vector.
        example_buffer: engagement groups kept for personalization and updates.
        negatives_per_group: shown-but-not-engaged items stored with each positive.
        trial_negatives_per_group: items drawn uniformly from the list and stored with each
            positive when the device scores trial rerankers (``Device.make_evaluation``).
        session_gap_ms: a gap longer than this starts a new session (resets the step budget).
        seed: rng seed (mixed with the device id).
    """

    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    feature: FeatureEncoderConfig = field(default_factory=FeatureEncoderConfig)
    parameter: ParameterEncoderConfig = field(default_factory=ParameterEncoderConfig)
    data: DataEncoderConfig = field(default_factory=DataEncoderConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    history_len: int = 50
    cache_items: int = 512
    k_exposures: int = 5
    skip_dwell_s: float = 2.0
    hide_deleted: bool = True
    exclude_consumed: bool = False
    inject_live_recall: bool = True
    max_injected: int = 5
    inject_cloud_z: float = 0.0
    recency_horizon_s: float = 7 * 86_400.0
    interest_half_life_s: float = 86_400.0
    example_buffer: int = 64
    negatives_per_group: int = 4
    trial_negatives_per_group: int = 16
    session_gap_ms: int = 30 * 60_000
    seed: int = 0
