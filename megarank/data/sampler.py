"""Data-parallel, resumable sampler over group indices.

The global sample stream is the concatenation of one permutation of range(num_groups) per epoch
(epoch e's permutation seeded by (seed, e)): global position i is group perm_e[i % num_groups] of
epoch e = i // num_groups. Each micro-step takes micro_batch_size * dp_size consecutive positions;
rank r takes its micro_batch_size slice of them. Unlike Megatron's
MegatronPretrainingRandomSampler nothing is dropped at an epoch end: a micro-batch may straddle two
epochs. Because the stream is a pure function of the position, the only resume state is the global
`consumed_samples`, and the same position maps to the same group whatever dp_size is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

# Leading word of every permutation seed; see groups._GROUP_STREAM.
_PERM_STREAM = 0x7065726D  # "perm"


def epoch_permutation(num_groups: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Group order of `epoch`: a seeded permutation, or the identity if not shuffle."""
    if not shuffle:
        return np.arange(num_groups)
    return np.random.default_rng([_PERM_STREAM, seed, epoch]).permutation(num_groups)


def positions_to_groups(
    positions: Sequence[int] | np.ndarray, num_groups: int, seed: int, shuffle: bool = True
) -> list[tuple[int, int]]:
    """Map global stream positions to (group_index, epoch) pairs: the sampler's definition."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs = positions // num_groups
    offsets = positions % num_groups
    groups = np.empty_like(positions)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        groups[mask] = epoch_permutation(num_groups, seed, int(epoch), shuffle)[offsets[mask]]
    return [(int(g), int(e)) for g, e in zip(groups, epochs, strict=True)]


class GroupSampler:
    """DP-sharded, resumable sampler over group indices, indexed by consumed samples."""

    def __init__(
        self,
        num_groups: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
        shuffle: bool = True,
    ) -> None:
        """Sampler for `dp_rank` of `dp_size`, starting at global position `consumed_samples`.

        Args:
            num_groups: groups per epoch (records in the dataset), > 0.
            micro_batch_size: groups per micro-batch on one rank, > 0.
            dp_rank: this rank's data-parallel rank, in [0, dp_size).
            dp_size: data-parallel world size, > 0.
            seed: data seed, >= 0.
            consumed_samples: samples (groups) already consumed by ALL ranks together; for a
                resume it is the checkpoint's value. A multiple of micro_batch_size * dp_size
                whenever the run stopped between micro-steps.
            shuffle: permute each epoch; False walks 0..num_groups-1 in order every epoch.
        """
        for name, value in (
            ("num_groups", num_groups),
            ("micro_batch_size", micro_batch_size),
            ("dp_size", dp_size),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_groups = num_groups
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.shuffle = shuffle

    @property
    def samples_per_micro_step(self) -> int:
        """Global positions consumed by one micro-step of all ranks: micro_batch_size * dp_size."""
        return self.micro_batch_size * self.dp_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Yield this rank's micro-batches forever: micro_batch_size (group_index, epoch) pairs."""
        mbs = self.micro_batch_size
        start = self.consumed_samples + self.dp_rank * mbs
        perms: dict[int, np.ndarray] = {}
        while True:
            batch = []
            for position in range(start, start + mbs):
                epoch, offset = divmod(position, self.num_groups)
                if epoch not in perms:
                    # A micro-batch spans at most a few epochs; keep only the ones still ahead.
                    for old in [e for e in perms if e < epoch - 1]:
                        del perms[old]
                    perms[epoch] = epoch_permutation(
                        self.num_groups, self.seed, epoch, self.shuffle
                    )
                batch.append((int(perms[epoch][offset]), epoch))
            yield batch
            start += self.samples_per_micro_step
