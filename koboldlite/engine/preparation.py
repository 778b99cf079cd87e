"""A request made ready for the queue, on the request's own thread: its prompt tokenized and fitted into the context,
its reply's length decided, its grammar checked. Only the vocabulary is read here, never a llama context."""

from __future__ import annotations

from ..errors import ContextOverflow, RequestError
from ..generation import GenerationRequest
from ..jobs import Job
from ..media import MEDIA_MARKER
from ..media_urls import not_readable
from .llama_model import LlamaModel, common_prefix_length
from .projector import MediaChunk, Projector


def tokenize_request(model: LlamaModel, request: GenerationRequest, projector: Projector | None = None
                     ) -> tuple[list[int], list[int], dict[int, MediaChunk]]:
    """(memory, prompt, media) as tokens; the BOS, when the model wants one, in front of whichever comes first (a
    prompt laid out as tokens already is taken as it is).
    Each media item (where MEDIA_MARKER stands in the text) becomes its projector's tokens and chunks: a chunk as a
    run of placeholder ids, found in `media` by the first."""
    if request.prompt_tokens is not None:
        return [], list(request.prompt_tokens), {}
    if not request.media:
        memory = model.tokenize(request.memory, add_bos=request.add_bos) if request.memory else []
        return memory, model.tokenize(request.prompt, add_bos=request.add_bos and not memory), {}
    if projector is None:            # the APIs refuse them first (MediaList); this is the engine's own guard
        raise not_readable("media", tuple(dict.fromkeys(item.kind for item in request.media)), ())
    markers = request.memory.count(MEDIA_MARKER) + request.prompt.count(MEDIA_MARKER)
    if markers != len(request.media):
        raise RequestError(f"{len(request.media)} images or audio were sent but the prompt places {markers} (the "
                           f"model's chat template dropped the message that held the others?)")
    items, media = iter(enumerate(request.media)), {}
    memory = tokens_with_media(model, projector, request.memory, request.add_bos, items, media)
    prompt = tokens_with_media(model, projector, request.prompt, request.add_bos and not memory, items, media)
    return memory, prompt, media


def tokens_with_media(model: LlamaModel, projector: Projector, text: str, add_bos: bool, items,
                      media: dict) -> list[int]:
    """`text` as tokens, each MEDIA_MARKER replaced by the next of `items` (index, MediaItem) as its projector's
    tokens and placeholder runs; each chunk put in `media` by its first placeholder."""
    parts = text.split(MEDIA_MARKER)
    tokens = model.tokenize("", add_bos=True) if add_bos and text else []
    for k, part in enumerate(parts):
        if part:
            tokens += model.tokenize(part, add_bos=False)
        if k == len(parts) - 1:
            break
        index, item = next(items)
        for piece in projector.media_pieces(item, f"media[{index}]"):
            if isinstance(piece, MediaChunk):
                ids = piece.placeholders()
                media[ids[0]] = piece
                tokens += ids
            else:
                tokens += piece
    return tokens


def count_prompt_tokens(model: LlamaModel, request: GenerationRequest, projector: Projector | None = None) -> int:
    """The tokens prepare_job would read for this request, before any cut to fit (count_tokens endpoints)."""
    memory, prompt, _ = tokenize_request(model, request, projector)
    return len(memory) + len(prompt)


def prepare_job(model: LlamaModel, request: GenerationRequest, context_shift: bool,
                projector: Projector | None = None) -> Job:
    """Tokenize, fit the prompt into the context, check the grammar: a job ready to queue.

    The reply never takes room from the prompt: it is capped by what the prompt leaves, unless a context shift
    lets it go past a full context. Only a Kobold request cuts its prompt, and only as KoboldCpp does (see
    GenerationRequest.cut_overlong_prompt); elsewhere a prompt that does not fit is ContextOverflow.
    """
    n_ctx = model.n_ctx
    if request.max_context_length is not None:
        n_ctx = max(16, min(n_ctx, request.max_context_length))
    memory, prompt, media = tokenize_request(model, request, projector)
    tokens = memory + prompt
    truncated = 0
    if request.cut_overlong_prompt:
        # Room for the reply as KoboldCpp keeps it, but an over-large max_length takes at most half.
        reserve = min(request.max_length or n_ctx, n_ctx // 2)
        room = n_ctx - reserve
        if len(tokens) > room:
            tokens = cut_from_the_front(model, memory, prompt, room)
            truncated = len(memory) + len(prompt) - len(tokens)
    elif len(tokens) >= n_ctx:
        raise ContextOverflow(len(tokens), n_ctx)
    if media:
        tokens = whole_media_runs(tokens, media)
        if tokens and tokens[-1] < 0:          # a prompt ends on text, whose last token's logits are drawn from
            tokens += model.tokenize("\n", add_bos=False)
    if not tokens:
        tokens = [model.bos if model.bos >= 0 else model.eos]
    room_left = n_ctx - len(tokens)
    if request.max_length is None:
        max_new = room_left            # until the context is full
    elif context_shift:
        max_new = request.max_length   # past a full context, by shifting it
    else:
        max_new = min(request.max_length, room_left)
    if request.sampler.grammar:
        model.check_grammar(request.sampler.grammar)
    job = Job(request, tokens, max(1, max_new))
    job.media = media
    job.n_ctx = n_ctx
    keep = memory if not truncated or not memory else []
    if request.keep_prefix:
        keep = model.tokenize(request.keep_prefix, add_bos=request.add_bos)
    job.n_keep = min(common_prefix_length(keep, tokens), n_ctx // 2)
    job.banned_token_ids = [t for t in request.sampler.banned_token_ids if model.valid_token(t)]
    job.stats.truncated_tokens = truncated
    return job


def cut_from_the_front(model: LlamaModel, memory: list[int], prompt: list[int], room: int) -> list[int]:
    """`room` tokens of memory and prompt: the oldest story text goes first, the memory stays as long as it can, and
    the model's BOS (which the tokenizer put first) stays first."""
    head = memory or prompt
    bos = head[:1] if head and model.add_bos and head[0] == model.bos else []
    if memory:
        memory = memory[len(bos):]
    else:
        prompt = prompt[len(bos):]
    room -= len(bos)
    keep_prompt = max(room - len(memory), 1)
    return bos + (memory + prompt[-keep_prompt:])[-room:]


def whole_media_runs(tokens: list[int], media: dict[int, MediaChunk]) -> list[int]:
    """The tokens without any media run a cut from the front left incomplete (its first placeholder gone)."""
    out, i = [], 0
    while i < len(tokens):
        if tokens[i] >= 0:
            out.append(tokens[i])
            i += 1
            continue
        chunk = media.get(tokens[i])
        n = chunk.n_tokens if chunk is not None else 1
        if chunk is not None and tokens[i:i + n] == chunk.placeholders():
            out += tokens[i:i + n]
            i += n
        else:                                   # the tail of a run whose head was cut: skip the rest of it
            while i < len(tokens) and tokens[i] < 0 and tokens[i] not in media:
                i += 1
    return out
