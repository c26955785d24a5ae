"""What crosses between an EngineLoop and its core: commands in, events out.

Both are plain frozen records that pickle, so the core may run on a thread of the client's
process or in a process of its own (`chatpager.engine.loop.process`). What only the client
can hold (a submitter's channel and tag) never crosses: the client keeps it by request id.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

from chatpager.engine.outputs import RequestOutput
from chatpager.engine.sampling_params import BeamSearchParams, SamplingParams

ProgressFn = Callable[[str, "float | None"], None]
# Text, token ids, or chat messages (rendered with the model's chat template).
Prompt = Union[str, Sequence[int], Sequence[Mapping[str, str]]]


# -- events (core -> client) ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoadProgress:
    stage: str
    fraction: float | None


@dataclass(frozen=True, slots=True)
class Loaded:
    model_info: dict


@dataclass(frozen=True, slots=True)
class LoadFailed:
    message: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """`request_id` passed the engine's checks and is queued; `tag` is what its submitter
    attached (the HTTP server's tenant and messages, say), for watchers of the main channel."""

    request_id: str
    tag: object = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A command about `request_id` could not be applied (bad prompt, pool too small...)."""

    request_id: str
    message: str
    bad_request: bool = True  # the request's own fault; False: the engine could not serve it
    too_long: bool = False  # the prompt exceeds the context or the whole pool (a chat may shorten it)


@dataclass(frozen=True, slots=True)
class EngineFailed:
    """A step raised: `request_ids` (every live request) have been dropped. If the engine
    cannot even be stepped to release them, it is given up and later submits are rejected."""

    message: str
    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Held:
    """The core spent the step budget of hold `serial` and steps no more until told. It comes
    after the snapshot of that moment; the client keeps it (no channel sees it)."""

    serial: int


Event = Union[LoadProgress, Loaded, LoadFailed, Accepted, Rejected, EngineFailed, Held, RequestOutput]


# -- commands (client -> core) -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Submit:
    request_id: str
    prompt: str | tuple[int, ...] | tuple[dict[str, str], ...]
    chat: bool  # `prompt` is chat messages, to render with the model's template
    params: SamplingParams | BeamSearchParams
    cache_salt: str | None


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Fork:
    request_id: str
    new_request_id: str
    params: SamplingParams | None


@dataclass(frozen=True, slots=True)
class Hold:
    """For tests and demos: take at most `steps` more engine steps, then hold (apply commands,
    take no step) until the next `Hold` or `Release`; answered by `Held(serial)` once held."""

    serial: int
    steps: int = 0


@dataclass(frozen=True, slots=True)
class Release:
    """End a hold: step whenever there is work again."""


@dataclass(frozen=True, slots=True)
class Close:
    """Stop after the commands before this one."""


Command = Union[Submit, Abort, Fork, Hold, Release, Close]


def group_ids(request_id: str, params: object) -> list[str]:
    """A request's id and its parallel samples' ids, as the engine reports them."""
    return [request_id] + [f"{request_id}.{i}" for i in range(1, getattr(params, "n", 1))]
