"""Markovian RSA test-time compute.

Fan a problem out into N reasoning traces, keep each trace's last ``tail_tokens`` tokens, have the
model aggregate random K-subsets of those tails into better traces, repeat for T rounds, pick the
answer. See ``RSAParams`` for every parameter and ``MarkovRSA`` for the async API.
"""

from ._answers import VoteResult, answers_equivalent, extract_answer, normalize_answer, vote
from ._backend import Backend, Outcome
from ._controller import MarkovRSA, call_seed, draw_subsets, to_messages
from ._errors import BackendError, CallOutcome, ConfigError, ErrorKind, MarkovRSAError, RunError
from ._events import (
    Event,
    FinalAggregationStarted,
    FinalDelta,
    Progress,
    RolloutFinished,
    RoundFinished,
    RoundStarted,
    RunFinished,
    RunStarted,
)
from ._http import OpenAIBackend
from ._params import PARAM_NAMES, PRESET_TABLE, PRESETS, Compaction, Preset, RSAParams, Schedule, Selection, Task, params_from_env, resolve_params
from ._prompts import aggregation_messages, load_template
from ._result import RolloutRecord, RoundSummary, RSAResult
from ._runlog import LoggedRun, RunLog, read_run_log
from ._settings import BackendSettings, Layers, make_backend
from ._sync import solve
from ._eval import evaluate, load_dataset, summarise
from ._tails import TRUNCATION_MARKER, Tail, make_tail
from ._tokenizers import SyncTokenizer, Tokenizer, local_tokenizer, tiktoken_tokenizer
from ._types import GenerationRequest, Message, Trace, Usage

from ._version import __version__

__all__ = [
    "PARAM_NAMES",
    "PRESETS",
    "PRESET_TABLE",
    "Preset",
    "Compaction",
    "TRUNCATION_MARKER",
    "Backend",
    "BackendError",
    "CallOutcome",
    "BackendSettings",
    "ConfigError",
    "ErrorKind",
    "Event",
    "FinalAggregationStarted",
    "FinalDelta",
    "GenerationRequest",
    "Layers",
    "LoggedRun",
    "RunLog",
    "MarkovRSA",
    "MarkovRSAError",
    "Message",
    "OpenAIBackend",
    "Outcome",
    "Progress",
    "RSAParams",
    "RSAResult",
    "RolloutFinished",
    "RolloutRecord",
    "RoundFinished",
    "RoundStarted",
    "RoundSummary",
    "RunError",
    "RunFinished",
    "RunStarted",
    "Schedule",
    "Selection",
    "SyncTokenizer",
    "Tail",
    "Task",
    "Tokenizer",
    "Trace",
    "Usage",
    "VoteResult",
    "__version__",
    "aggregation_messages",
    "answers_equivalent",
    "call_seed",
    "draw_subsets",
    "evaluate",
    "load_dataset",
    "read_run_log",
    "summarise",
    "extract_answer",
    "load_template",
    "local_tokenizer",
    "make_backend",
    "make_tail",
    "normalize_answer",
    "params_from_env",
    "resolve_params",
    "solve",
    "tiktoken_tokenizer",
    "to_messages",
    "vote",
]
