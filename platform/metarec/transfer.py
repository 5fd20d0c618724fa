"""Cross-domain transfer: a model meta-trained on dataset A adapts to the users of dataset B.

What carries over is what the two datasets *name* alike: genres, release years and user
features (age group, gender, occupation, zip prefix). Their integer codes differ between
prepared datasets (vocabularies are sorted per dataset, and one dataset may lack a genre
the other has), so every feature is mapped by name through the manifests' ``vocab``
(``data.features``): B's code -> the name -> A's code, and a name A never saw -> A's
"unknown" code 0. Item ids do not carry over: every B item takes A's shared *unseen item*
row (zero) and a zero item bias, exactly like an item that appeared after A's training,
so B's items are scored from their features and the user's support ratings alone. A's
neighbourhood term goes too: its graph links A's items, and B's have none to carry.

The transferred network is A's, unchanged, reading B's side tables translated into A's
codes; adaptation then runs the same ``meta.adapt`` as everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metarec.data.features import USER_FEATURES
from metarec.data.prepared import PreparedDataset
from metarec.errors import DataError
from metarec.initialise import dataset_features
from metarec.meta import MetaLearner
from metarec.model import Features, Recommender

__all__ = ["FeatureMapping", "map_features", "transfer_learner", "vocab_index"]

ITEM_PARAMS = ("model.emb.item", "model.item_bias")  # sized by A's catalogue: not carried
FEATURES = ("genre", "year_bucket", *USER_FEATURES)


def vocab_index(source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """For each target code, the source code of the same name; 0 where the source lacks it.

    Code 0 is "unknown" (or padding) in every vocabulary, so it maps to 0 whatever its name.

    >>> vocab_index(["<unk>", "F", "M"], ["<unk>", "M", "F", "X"]).tolist()
    [0, 2, 1, 0]
    """
    position = {name: i for i, name in enumerate(source) if i > 0}
    return np.array([0] + [position.get(name, 0) for name in target[1:]], dtype=np.int64)


@dataclass(frozen=True)
class FeatureMapping:
    """B's codes in A's codes, per feature, and which of B's names A lacks."""

    index: dict[str, np.ndarray]  # feature -> (B vocab size,) A code of each B code
    missing: dict[str, list[str]]  # feature -> B names without an A counterpart

    def coverage(self) -> dict[str, str]:
        """``"matched/total"`` names per feature (the unknown code not counted)."""
        return {
            f: f"{len(idx) - 1 - len(self.missing[f])}/{len(idx) - 1}"
            for f, idx in self.index.items()
        }


def map_features(
    source_vocab: dict[str, list[str]], target_vocab: dict[str, list[str]]
) -> FeatureMapping:
    """Map every feature both datasets name (``FEATURES``) from B's codes to A's."""
    absent = [f for f in FEATURES[:2] if f not in source_vocab or f not in target_vocab]
    if absent:
        raise DataError(f"vocab: got no {absent[0]!r} vocabulary; expected one in both manifests")
    index, missing = {}, {}
    for f in FEATURES:
        if f in source_vocab and f in target_vocab:
            index[f] = vocab_index(source_vocab[f], target_vocab[f])
            names = target_vocab[f][1:]
            missing[f] = [n for n, i in zip(names, index[f][1:], strict=True) if i == 0]
    return FeatureMapping(index, missing)


def _mapped_features(
    target: Features,
    mapping: FeatureMapping,
    source_sizes: dict[str, int],
    *,
    n_users: int,
    use_user: bool,
) -> Features:
    """B's side tables written in A's codes (genre bags re-normalised over known genres)."""
    genre = torch.as_tensor(mapping.index["genre"])
    known = genre > 0
    bags = torch.zeros(target.item_genres.shape[0], source_sizes["genre"])
    bags.index_add_(1, genre[known], target.item_genres[:, known])  # (I_B, G_A)
    bags /= bags.sum(1, keepdim=True).clamp_min(1e-12)  # mean over the genres A knows
    year = torch.as_tensor(mapping.index["year_bucket"])[target.item_year]
    users = None
    if use_user:
        users = torch.zeros(n_users, len(USER_FEATURES), dtype=torch.long)
        if target.user_table is not None:  # B without user features: every user unknown
            for k, f in enumerate(USER_FEATURES):
                users[:, k] = torch.as_tensor(mapping.index[f])[target.user_table[:, k]]
    return Features(
        item_genres=bags,
        item_year=year,
        item_seen=torch.zeros(len(year), dtype=torch.bool),  # every B item: A's unseen row
        user_table=users,
        vocab_sizes=source_sizes,
        user_names=USER_FEATURES if use_user else (),
    )


def transfer_learner(
    learner: MetaLearner, source_vocab: dict[str, list[str]], target: PreparedDataset
) -> tuple[MetaLearner, FeatureMapping]:
    """A's learner, rebuilt to score B's items and users (see the module docstring).

    Args:
        learner: trained on A (e.g. ``checkpoint.learner_from_checkpoint``).
        source_vocab: A's manifest ``vocab`` (names by code, per feature).
        target: B, the prepared dataset whose users it will adapt to.
    Returns:
        The transferred learner (eval mode, on the CPU) and the feature mapping used.
    """
    src = learner.model
    mapping = map_features(source_vocab, target.manifest["vocab"])
    feats = _mapped_features(
        dataset_features(target),
        mapping,
        src.vocab_sizes,
        n_users=target.manifest["counts"]["users"],
        use_user=src.use_user,
    )
    model = Recommender(
        feats,
        embedding_dim=src.emb["genre"].shape[1],
        hidden=tuple(src.mlp[f"{k}_weight"].shape[1] for k in range(len(src.mlp) // 2)),
        item_id_embedding=src.item_id_embedding,
        use_user_features=src.use_user,
        global_mean=float(src.global_mean),
        factor_head=src.has_factor_head,
    )
    out = MetaLearner(model, learner.cfg)
    state = out.state_dict()
    source = learner.state_dict()
    if src.has_neighbours:  # the prior precision of the neighbour weight, second to last
        keep = torch.arange(len(source["log_precision"])) != len(source["log_precision"]) - 2
        source["log_precision"] = source["log_precision"][keep]
    for name, value in source.items():
        if name.startswith(ITEM_PARAMS):
            continue
        if name.startswith("log_inner_lrs.") and name.endswith(("emb__item", "item_bias")):
            state[name] = value.mean().expand_as(state[name]).clone()  # per-item lrs: no match
        elif name in state and not name.startswith(("model.item_", "model.user_table")):
            state[name] = value
    with torch.no_grad():
        state["model.item_bias"] = torch.zeros_like(state["model.item_bias"])
        if "model.emb.item" in state:
            state["model.emb.item"] = torch.zeros_like(state["model.emb.item"])
    out.load_state_dict(state)
    return out.eval(), mapping
