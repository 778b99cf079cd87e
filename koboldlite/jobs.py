"""Jobs: one generation each, with the token buffer its readers wait on; why a reply stops; a job's states."""

from __future__ import annotations

import dataclasses
import enum
import threading
import time

from .generation import GenerationRequest


class StopReason(enum.Enum):
    """Why a reply ended. The engine (or the scheduler, for a job it never started) says it once; each API translates
    it: KoboldCpp's stop_reason codes, OpenAI's finish_reason, Ollama's done_reason, Anthropic's stop_reason, the
    Responses API's status."""

    END = "stop"                # the model ended its turn (an end-of-generation or stop token), or no token may follow
    STOP_STRING = "stop string"  # a stop string (JobStats.stop_string says which)
    LENGTH = "length"           # its length limit, or a full context that could not shift
    ABORTED = "abort"           # the client asked or hung up, or the server is stopping
    FAILED = "error"            # the generation failed (TokenBuffer.error says why)

    @property
    def wire(self) -> str:
        """The word most clients know, and the log's: stop, length, abort or error."""
        return "stop" if self is StopReason.STOP_STRING else self.value

    @property
    def finished(self) -> bool:
        """The reply came to its own end (as opposed to aborted or failed): held-back text is real text."""
        return self in (StopReason.END, StopReason.STOP_STRING, StopReason.LENGTH)


@dataclasses.dataclass(frozen=True)
class PromptProgress:
    """How far the reading of a job's prompt has come (llama-server's `prompt_progress`): of `total` tokens, `cache`
    were already in the cache and `processed` (the cached ones included) are read, `time_ms` after it began."""
    total: int
    cache: int
    processed: int
    time_ms: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class TokenBuffer:
    """The text one generation has produced so far, and how far the reading of its prompt has come.

    The generation loop appends (and reports progress); any number of readers (an SSE writer, the check endpoint,
    a blocking generate) wait on the condition for more.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self.stop_reason: StopReason | None = None   # set once, when the generation ends
        self.error: str | None = None
        self._progress: PromptProgress | None = None
        self._progress_reports = 0          # how many there were: a reader knows whether it has seen the last

    def append(self, piece: str):
        with self._cond:
            self._pieces.append(piece)
            self._cond.notify_all()

    def report_progress(self, progress: PromptProgress):
        """The engine read more of the prompt: readers that follow the progress wake."""
        with self._cond:
            self._progress = progress
            self._progress_reports += 1
            self._cond.notify_all()

    def progress(self) -> tuple[int, PromptProgress | None]:
        """(reports so far, the last one)."""
        with self._cond:
            return self._progress_reports, self._progress

    def close(self, reason: StopReason, error: str | None = None):
        with self._cond:
            if self.stop_reason is None:
                self.stop_reason = reason
                self.error = error
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def text(self) -> str:
        with self._cond:
            return "".join(self._pieces)

    def read(self, start: int, timeout: float | None = None, progress_seen: int | None = None
             ) -> tuple[list[str], bool]:
        """Pieces from index `start` on, waiting until there is one or the buffer is done; with `progress_seen` (the
        reports a reader has seen), also until there is a newer progress report."""
        def ready() -> bool:
            return len(self._pieces) > start or self.stop_reason is not None or (
                progress_seen is not None and self._progress_reports != progress_seen)
        with self._cond:
            self._cond.wait_for(ready, timeout)
            return self._pieces[start:], self.stop_reason is not None

    def wait_prompt_read(self, timeout: float | None = None) -> bool:
        """Wait until the prompt has been read (its last progress report is whole, or text came, or it ended)."""
        def read() -> bool:
            p = self._progress
            return bool(self._pieces) or self.stop_reason is not None or (p is not None and p.processed >= p.total)
        with self._cond:
            return self._cond.wait_for(read, timeout)

    def wait_done(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.stop_reason is not None, timeout)


@dataclasses.dataclass
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives, as (token, logprob)."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class JobStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    seed: int = 0
    truncated_tokens: int = 0   # prompt tokens cut from the front to fit (Kobold API only)
    shifted_tokens: int = 0     # tokens a context shift dropped while generating
    stop_string: str | None = None   # the stop string that ended the reply (StopReason.STOP_STRING)
    model: str = ""             # the model that served it
    drafted_tokens: int = 0     # tokens proposed by speculative drafts and checked by the model
    draft_accepted: int = 0     # of those, the ones the model's own sampling kept
    cache_source: str = "none"  # where the prompt's cached tokens came from: slot, ram, disk or none
    media_chunks: int = 0       # image and audio chunks encoded for it (a cached one is not encoded again)
    media_seconds: float = 0.0  # the time that took
    first_token_at: float = 0.0  # time.monotonic() when the first token was drawn (0: not yet)

    @property
    def truncated(self) -> bool:
        """llama-server's word: some of the text was not in the context when the reply was made."""
        return bool(self.truncated_tokens or self.shifted_tokens)


class JobState(enum.Enum):
    """Where a job is. QUEUED -> STARTING (taken by the generation thread) -> RUNNING (admitted to a slot);
    STARTING -> QUEUED when no slot has room yet; any -> DONE when it ends, whatever ended it. The scheduler moves a
    job between the first three; Job.end alone makes it DONE."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    DONE = "done"


JOB_MOVES = {JobState.QUEUED: {JobState.STARTING}, JobState.STARTING: {JobState.RUNNING, JobState.QUEUED},
             JobState.RUNNING: set(), JobState.DONE: set()}


class Job:
    """One generation: its request, tokenized prompt, buffer and cancellation."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, request: GenerationRequest, prompt_tokens: list[int], max_new_tokens: int):
        self.id = next(Job._ids)
        self.request = request
        self.genkey = request.genkey
        self.client = request.client        # whose turn it is in the queue
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.n_ctx = 0                  # the context this job may fill (its max_context_length)
        self.n_keep = 0                 # leading tokens a context shift keeps (memory, system turn)
        self.stop_tokens = frozenset(request.stop_token_ids)
        self.media: dict = {}           # a media chunk by its first placeholder id in prompt_tokens (engine/projector.py)
        self.banned_token_ids: list[int] = []   # resolved from the request's bans by the engine
        self.ignored_fields: list[str] = list(request.ignored_fields)
        self.logprobs: list[TokenLogprob] = []   # one per token shown, appended before its text
        self.buffer = TokenBuffer()
        self.cancelled = threading.Event()
        self.state = JobState.QUEUED
        self.stats = JobStats(prompt_tokens=len(prompt_tokens))
        self.created = time.monotonic()
        self.linked: list[Job] = []     # jobs cancelled with this one (the other choices of one request)
        self.adapter_key: tuple = ()    # the LoRA scales it runs under (engine/adapters.py ScaleKey; (): none)

    def cancel(self):
        self.cancelled.set()
        for job in self.linked:
            job.cancel()

    def move(self, state: JobState):
        """The scheduler moves it along (JobState says which moves there are)."""
        if state not in JOB_MOVES[self.state]:
            raise RuntimeError(f"job {self.id} cannot go from {self.state.value} to {state.value}")
        self.state = state

    def end(self, reason: StopReason, error: str | None = None):
        """Done, whatever the reason: readers of its buffer wake and see why."""
        self.state = JobState.DONE
        self.buffer.close(reason, error)
