"""Transcription: OpenAI's /v1/audio/transcriptions (a multipart form) and KoboldCpp's /api/extra/transcribe
(JSON, or the same form). The model hears the clip through its audio projector, as a chat turn that asks for
its words (llama-server does the same), and its reply is the transcript. Needs a model whose projector reads
audio (Ultravox, Voxtral, Qwen2-Audio, Gemma 3n...): others answer 400."""

from __future__ import annotations

import email.parser
import email.policy
from typing import Any

from ..errors import RequestError
from ..fields import FieldReader
from ..generation import SamplerSettings
from ..media import MEDIA_MARKER, MediaKind, decode_base64, read_media
from ..media_urls import MediaList
from ..service.exchange import JSONResponse, Response, wait_for_text
from .common import chat_request, genkey_of

TRANSCRIBE_INSTRUCTION = "Transcribe audio to text"
RESPONSE_FORMATS = ("json", "text", "verbose_json")


def multipart_form(req) -> dict[str, Any]:
    """A multipart/form-data body's fields: bytes for a file, text for the others."""
    content_type = req.headers.get("Content-Type") or ""
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError("send the audio as a multipart/form-data form with a 'file' field", status=415)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + req.body)
    if not message.is_multipart():
        raise RequestError("the multipart form could not be read (its boundary is missing or wrong)")
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        form[name] = data if part.get_filename() is not None or name == "file" else data.decode("utf-8", "replace")
    return form


def transcribe(req, model: str | None, data: bytes, where: str, prompt: str, language: str, temperature: float,
               max_tokens: int | None, ignored: list[str]) -> tuple[str, Any]:
    """The clip's transcript, and the job that made it (its usage). Without `max_tokens`, a transcript is cut at
    16 tokens a second of audio (speech is 3 to 5): a model that never ends its turn stops there."""
    served = req.use(model or None)
    media = MediaList()
    media.append(read_media(data, where, (MediaKind.AUDIO,)))
    if served.projector is None or not served.projector.audio:
        raise RequestError(f"the model {served.name} does not hear audio: transcription needs a model whose projector "
                           f"reads audio (--mmproj)")
    words = (prompt or TRANSCRIBE_INSTRUCTION) + (f" (language: {language})" if language else "")
    seconds = media[0].seconds if media[0].seconds is not None else len(data) / 16000   # MP3: ~128 kbit/s
    sampler = SamplerSettings(temperature=temperature, top_k=40, top_p=0.95)
    request = chat_request(served, [{"role": "user", "content": words + MEDIA_MARKER}],
                           {"sampler": sampler, "max_length": max_tokens or int(32 + 16 * seconds),
                            "genkey": genkey_of(req, {}), "media": media, "ignored_fields": ignored})
    job = req.start_generation(request)
    return wait_for_text(job).strip(), job


def _number(value: Any, name: str, lo: float, hi: float, default: float) -> float:
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except ValueError:
        raise RequestError(f"'{name}' must be a number, not {value!r}") from None
    if not lo <= number <= hi:
        raise RequestError(f"'{name}' must be between {lo:g} and {hi:g}")
    return number


def openai_transcriptions(app, req):
    """OpenAI's form: file, model, language, prompt, response_format (json, text, verbose_json), temperature."""
    form = multipart_form(req)
    if not isinstance(form.get("file"), bytes) or not form["file"]:
        raise RequestError("'file' is required: the audio file (wav, mp3 or flac)")
    fmt = form.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise RequestError(f"response_format {fmt!r} is not served here (json, text or verbose_json; no timestamps "
                           f"for srt or vtt)")
    ignored = [k for k in form if k in ("timestamp_granularities[]", "chunking_strategy", "include[]", "stream")]
    temperature = _number(form.get("temperature"), "temperature", 0, 2, 0.0)
    max_tokens = int(_number(form.get("max_tokens"), "max_tokens", 1, 1 << 20, 0)) or None   # llama-server's
    text, job = transcribe(req, form.get("model"), form["file"], "file", form.get("prompt") or "",
                           form.get("language") or "", temperature, max_tokens, ignored)
    if fmt == "text":
        return Response(200, (text + "\n").encode(), "text/plain; charset=utf-8")
    s = job.stats
    usage = {"type": "tokens", "input_tokens": s.prompt_tokens, "output_tokens": s.generated_tokens,
             "total_tokens": s.prompt_tokens + s.generated_tokens,
             "input_tokens_details": {"cached_tokens": s.cached_tokens}}
    if fmt == "json":
        return JSONResponse({"text": text, "usage": usage})
    seconds = job.request.media[0].seconds or 0.0
    return JSONResponse({"task": "transcribe", "language": form.get("language") or "", "duration": seconds,
                         "text": text, "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                                                     "temperature": temperature}],
                         "usage": usage})


def kobold_transcribe(app, req):
    """KoboldCpp's: {"audio_data": base64 or a data: URI, "prompt", "langcode"}, or OpenAI's form; {"text"}."""
    if (req.headers.get("Content-Type") or "").lower().startswith("multipart/"):
        form = multipart_form(req)
        data, prompt, language = form.get("file"), form.get("prompt") or "", form.get("language") or ""
        ignored: list[str] = []
        if not isinstance(data, bytes) or not data:
            raise RequestError("'file' is required: the audio file (wav, mp3 or flac)")
    else:
        f = FieldReader(req.json())
        data = decode_base64(f.body.get("audio_data"), "audio_data")
        prompt, language = f.string("prompt"), f.string("langcode", "language")
        if language == "auto":
            language = ""
        ignored = [k for k in f.body if k in ("suppress_non_speech",)]
    text, _ = transcribe(req, None, data, "audio_data", prompt, language, 0.0, None, ignored)
    return JSONResponse({"text": text})
