"""User Adapter (Zhong et al. 2021) as used by Personalized MulT (Lu et al., seeds/).

Per user and per modality a learnable embedding u' is reparameterized by an MLP into a
token u of size d_model (u = MLP(u'), hidden 512 in the paper), and `prompt_len` such
tokens are inserted into that modality's sequence right after the Conv1D projection:
h = [X_hat, u] (position "end", the paper) or h = [u, X_hat] (position "start").

The reparameterization is there because u' alone is optimized unstably from few samples
(paper, Sec. 4.1; same trick as prefix-tuning). Row 0 of every embedding is the UNKNOWN
user, so a speaker never seen in training (cold start) still gets a token.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from psamf.config import UserAdapterConfig

UNKNOWN = 0  # embedding row of the UNKNOWN user
MODALITIES = ("text", "audio", "visual")


class UserVocab:
    """Speaker-id strings <-> embedding rows. Known users get 1..n; anything else is UNKNOWN (0).

    Users are sorted, so the same set of speakers always gets the same rows whatever order
    they were listed in (checkpoints stay loadable across runs that list speakers differently).
    """

    def __init__(self, users: Iterable[str] = ()):
        self.users: list[str] = sorted({str(u) for u in users})
        self._index = {u: i + 1 for i, u in enumerate(self.users)}

    def __len__(self) -> int:  # number of known users; the embedding has len + 1 rows
        return len(self.users)

    def __contains__(self, user: object) -> bool:
        return str(user) in self._index

    def index(self, user: str | None) -> int:
        return self._index.get(str(user), UNKNOWN) if user is not None else UNKNOWN

    def encode(self, users: Sequence[str | None]) -> torch.Tensor:
        """A batch of speaker ids -> LongTensor[B] of rows (unknown -> 0)."""
        return torch.tensor([self.index(u) for u in users], dtype=torch.long)

    def add(self, user: str) -> int:
        """Append a new user (e.g. the held-out LOO user before fine-tuning); returns its row.

        Appending (not re-sorting) keeps every existing row where a saved model expects it.
        `UserAdapter.add_users` does this and resizes the embeddings to match.
        """
        user = str(user)
        if user not in self._index:
            self.users.append(user)
            self._index[user] = len(self.users)
        return self._index[user]

    def to_list(self) -> list[str]:
        """Row order as a JSON-able list: row i + 1 is users[i]."""
        return list(self.users)

    @classmethod
    def from_list(cls, users: list[str]) -> "UserVocab":
        """Inverse of to_list, preserving the row order exactly (even if it is not sorted)."""
        v = cls()
        for u in users:
            v.add(u)
        return v


class UserAdapter(nn.Module):
    """u' (nn.Embedding per modality) -> MLP per modality -> prompt_len tokens of size d_model.

    `users`: a UserVocab (or the speaker ids to build one) so the adapter can `encode` speaker
    ids itself and the id -> row mapping is saved in its state_dict; or just a count of users
    when the caller maps ids to rows 1..n itself.
    `unknown_p`: while training, each sample's user is replaced by UNKNOWN with this
    probability, so row 0 learns a population-average token during pretraining and a
    cold-start user gets a sensible prompt instead of an untrained random one. 0 = paper.
    """

    def __init__(self, users: UserVocab | Iterable[str] | int, d_model: int, cfg: UserAdapterConfig,
                 unknown_p: float = 0.1):
        super().__init__()
        if not 0.0 <= unknown_p < 1.0:
            raise ValueError(f"unknown_p must be in [0, 1), got {unknown_p}")
        if isinstance(users, int):
            self.vocab, n_users = None, users
        else:
            self.vocab = users if isinstance(users, UserVocab) else UserVocab(users)
            n_users = len(self.vocab)
        self.n_users = n_users
        self.d_model = d_model
        self.prompt_len = cfg.prompt_len
        self.position = cfg.position
        self.includes_conv = cfg.includes_conv  # MulT puts its Conv1D in the adapter's optimizer group
        self.unknown_p = unknown_p
        # One row of prompt_len * d_model per user: each prompt token has its own u', and the
        # modality's MLP is shared across the prompt tokens (as in prefix-tuning).
        self.user_embedding = nn.ModuleDict(
            {m: nn.Embedding(n_users + 1, cfg.prompt_len * d_model) for m in MODALITIES}
        )
        self.mlp = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d_model, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, d_model))
            for m in MODALITIES
        })

    def encode(self, users: Sequence[str | None]) -> torch.Tensor:
        """Speaker ids -> LongTensor[B] of rows; unseen or None -> UNKNOWN (0)."""
        if self.vocab is None:
            raise ValueError("this UserAdapter was built from a user count, not a UserVocab")
        return self.vocab.encode(users)

    def add_users(self, users: Iterable[str]) -> list[int]:
        """Give new speakers (e.g. the held-out LOO user) their own rows, starting at UNKNOWN's.

        Call before building the fine-tuning optimizer: the embeddings are replaced.
        """
        if self.vocab is None:
            raise ValueError("this UserAdapter was built from a user count, not a UserVocab")
        rows = [self.vocab.add(u) for u in users]
        self.grow(len(self.vocab))
        return rows

    # The vocab travels in the state_dict, so a saved adapter keeps its id -> row mapping.
    def get_extra_state(self):
        return {"users": None if self.vocab is None else self.vocab.to_list()}

    def set_extra_state(self, state) -> None:
        users = (state or {}).get("users")
        self.vocab = None if users is None else UserVocab.from_list(users)

    def forward(self, user_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """LongTensor[B] of rows -> {modality: u [B, prompt_len, d_model]}."""
        if user_ids.dim() != 1:
            raise ValueError(f"user_ids must be LongTensor[B], got shape {tuple(user_ids.shape)}")
        if user_ids.numel() and (int(user_ids.min()) < 0 or int(user_ids.max()) > self.n_users):
            raise ValueError(f"user_ids must be in [0, {self.n_users}] (0 = unknown)")
        if self.training and self.unknown_p > 0:
            drop = torch.rand(user_ids.shape, device=user_ids.device) < self.unknown_p
            user_ids = user_ids.masked_fill(drop, UNKNOWN)
        B = user_ids.shape[0]
        return {
            m: self.mlp[m](self.user_embedding[m](user_ids).view(B, self.prompt_len, self.d_model))
            for m in MODALITIES
        }

    def insert(self, x: torch.Tensor, mask: torch.Tensor | None, u: torch.Tensor):
        """Put tokens u [B,P,d] at the start or end of x [B,T,d]; the mask [B,T] grows to match.

        What the position changes, given MulT's causal mask and last-step readout:
        - "end" (paper): the token is the last step, so it is what gets read out; it attends
          to every real step (and, in the crossmodal layers, to the whole source sequence),
          acting like a per-user CLS token. With the causal mask on, no real step can see
          it, so the user enters the prediction only through the read-out step; with it
          off, every step can attend to it as well.
        - "start": every step of the sequence can attend to the token (causal or not), so
          the user conditions all hidden states, but the read-out step is the last real
          step, not the token. Positional encodings of the real steps shift by prompt_len.
        With padding, "end" appends after the padded steps; padded keys are masked, so the
        token still sees exactly the real steps.
        """
        parts = [x, u] if self.position == "end" else [u, x]
        x = torch.cat(parts, dim=1)
        if mask is not None:
            ones = mask.new_ones(mask.shape[0], u.shape[1])
            mask = torch.cat([mask, ones] if self.position == "end" else [ones, mask], dim=1)
        return x, mask

    @torch.no_grad()
    def grow(self, n_users: int) -> None:
        """Resize to n_users (rows 1..n_users); new rows start as a copy of UNKNOWN.

        Starting from the UNKNOWN row means a new user's first prediction equals the
        cold-start prediction, and few-shot fine-tuning moves it from there. Replaces the
        embedding parameters: build optimizers afterwards.
        """
        if n_users < self.n_users:
            raise ValueError(f"cannot shrink the adapter from {self.n_users} to {n_users} users")
        for m, emb in self.user_embedding.items():
            new = nn.Embedding(n_users + 1, emb.embedding_dim).to(emb.weight.device, emb.weight.dtype)
            new.weight.copy_(emb.weight[UNKNOWN].expand_as(new.weight))
            new.weight[: self.n_users + 1] = emb.weight
            self.user_embedding[m] = new
        self.n_users = n_users
