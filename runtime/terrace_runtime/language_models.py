"""Real causal language models from a model folder, as generation `Decoder`s.

- ``format: onnx``: an onnxruntime-genai folder (``genai_config.json``,
  ``model.onnx``; made by ``terrace-runtime convert --to onnx-int4``). The
  CPU provider, or CUDA when asked for and present. Each sequence owns an
  ``og.Generator`` (its KV cache); the engine samples from the logits the
  generator returns and appends the chosen token, so sampling, seeds, stop
  strings and logprobs are the same code for every model.
- ``format: torch``: a Hugging Face folder (``config.json`` and weights;
  ``terrace-runtime convert --to torch``) loaded with transformers'
  ``AutoModelForCausalLM`` on CUDA when present, else CPU. Each sequence owns
  a KV cache; a step left-pads the running sequences' caches into one batch.

Both read the folder's own tokenizer (`hf_tokenizer.HFTokenizer`). Load
errors raise `models.ModelLoadError` with the reason shown in
``/v2/health/ready``. Weights never come from a hub: the folder is local.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .generation import Sequence_
from .hf_tokenizer import HFTokenizer, TokenizerError
from .models import ModelInfo, ModelLoadError, torch_device

log = logging.getLogger(__name__)


@dataclass
class LanguageModel:
    info: ModelInfo
    tokenizer: HFTokenizer
    decoder: Any  # generation.Decoder
    context_length: int

    def close(self) -> None:
        self.decoder.close()


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "genai_config.json").exists() or (path / "config.json").exists()
    )


def load_language_model(
    path: Path,
    *,
    fmt: str,
    device: str,
    threads: int,
    chat_template: str | None = None,
    spinning: bool = False,
) -> LanguageModel:
    """Load the folder `path` as `fmt` ("onnx" or "torch"). Raises ModelLoadError."""
    try:
        tokenizer = HFTokenizer(path, chat_template=chat_template)
    except TokenizerError as exc:
        raise ModelLoadError(str(exc)) from exc
    if fmt == "onnx":
        if not (path / "genai_config.json").exists():
            raise ModelLoadError(
                f"{path} is not an onnxruntime-genai folder (no genai_config.json); "
                "make one with `terrace-runtime convert --to onnx-int4`"
            )
        decoder: Any = OnnxDecoder(path, device=device, threads=threads, spinning=spinning)
    elif fmt == "torch":
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is not a Hugging Face model folder (no config.json); "
                "make one with `terrace-runtime convert --to torch`"
            )
        decoder = TransformersDecoder(path, device=device, threads=threads)
    else:
        raise ModelLoadError(f"unknown model format {fmt!r} for a model folder")
    info = ModelInfo(
        task="text-generation",
        format=fmt,
        platform="onnxruntime_genai" if fmt == "onnx" else "pytorch_transformers",
        device=decoder.device,
        threads=threads,
        inputs=(),
        outputs=(),
        quantization=decoder.quantization,
        extra={"architecture": decoder.architecture},
    )
    return LanguageModel(info, tokenizer, decoder, decoder.context_length)


class BatchedOnnxDecoder:
    """An onnxruntime-genai folder's ``model.onnx`` run with onnxruntime
    directly, stepping every running sequence in one batch.

    The model builder's decoder takes ``input_ids`` [B, S], ``attention_mask``
    [B, T] and per layer ``past_key_values.{i}.key/value`` [B, kv_heads, C,
    head]; its GroupQueryAttention reads each row's length from the mask
    (``sum(mask) - 1``), applies RoPE at that row's own positions, and, when
    a layer's past and present are the same memory, writes the new token's
    key and value in place after the row's last one. So every running
    sequence owns a **slot**: row r of one preallocated buffer per layer
    ([slots, kv_heads, C, head]), shared by past and present through IO
    binding. A step binds the first n rows; nothing is copied. A new
    sequence is prefilled alone straight into its slot; a finished one's
    slot is refilled by moving the last row into it, which keeps the running
    rows contiguous. C (the capacity) is the model's sliding window (Gemma
    3: 512), which its sliding-window layers require, or 1024 without one;
    `fits` says which sequences this decoder serves (`OnnxDecoder` gives the
    longer ones to onnxruntime-genai, which slides the window).
    """

    def __init__(self, folder: Path, *, threads: int, spinning: bool = False) -> None:
        """`spinning`: onnxruntime's pool threads spin between ops (its own
        default, and onnxruntime-genai's) or sleep (Terrace's default)."""
        import onnxruntime as ort

        from .models import session_options

        raw = json.loads((folder / "genai_config.json").read_text())
        model = raw.get("model", {})
        dec = model.get("decoder", {})
        names = dec.get("inputs", {})
        outputs = dec.get("outputs", {})
        self.layers = int(dec["num_hidden_layers"])
        self.past = [
            (names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)
        ]
        self.present = [
            (outputs["present_key_names"] % i, outputs["present_value_names"] % i)
            for i in range(self.layers)
        ]
        path = folder / dec.get("filename", "model.onnx")
        try:
            self.session = ort.InferenceSession(
                str(path), session_options(threads, spinning), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load {folder}: {exc}") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        expected = {"input_ids", "attention_mask", *(n for pair in self.past for n in pair)}
        if set(inputs) != expected:
            raise UnsupportedGraph(f"inputs {sorted(set(inputs) ^ expected)} differ")
        first = inputs[self.past[0][0]]
        if "float" not in first.type or "16" in first.type:
            raise UnsupportedGraph(f"KV cache type {first.type} (float32 only)")
        self.kv_heads = int(dec.get("num_key_value_heads") or first.shape[1])
        self.head = int(dec.get("head_size") or first.shape[3])
        self.device = "cpu"
        self.context_length = int(model.get("context_length") or 2048)  # longer: OgaDecoder
        self.window = int((dec.get("sliding_window") or {}).get("window_size") or 0)
        self.capacity = self.window or min(self.context_length, 1024)
        self.architecture = str(model.get("type", "unknown"))
        self.quantization = _onnx_precision(path)
        self.rows: list[Sequence_] = []  # row r holds rows[r]
        self.lengths: list[int] = []  # tokens in each row's cache
        self.slots = 0
        self.cache: list[np.ndarray] = []  # per layer key, value: [slots, kv_heads, C, head]
        self._bound: tuple[tuple[int, int, int], Any] | None = None

    def fits(self, seq: Sequence_) -> bool:
        """Whether the whole sequence fits in a slot."""
        return len(seq.prompt) + seq.params.max_tokens <= self.capacity

    def _grow(self, slots: int) -> None:
        shape = (slots, self.kv_heads, self.capacity, self.head)
        grown = [np.zeros(shape, np.float32) for _ in range(2 * self.layers)]
        for new, old in zip(grown, self.cache, strict=False):
            new[: len(self.rows)] = old[: len(self.rows)]
        self.cache, self.slots = grown, slots

    def _binding(self, first: int, count: int) -> Any:
        """An IO binding of rows [first, first + count) of every layer's cache
        as both past and present; kept while the rows stay the same."""
        key = (first, count, self.slots)
        if self._bound is not None and self._bound[0] == key:
            return self._bound[1]
        binding = self.session.io_binding()
        shape = [count, self.kv_heads, self.capacity, self.head]
        for (past_k, past_v), (pres_k, pres_v), i in zip(
            self.past, self.present, range(self.layers), strict=True
        ):
            for past, present, buf in (
                (past_k, pres_k, self.cache[2 * i]),
                (past_v, pres_v, self.cache[2 * i + 1]),
            ):
                pointer = buf[first].ctypes.data
                binding.bind_input(past, "cpu", 0, np.float32, shape, pointer)
                binding.bind_output(present, "cpu", 0, np.float32, shape, pointer)
        self._bound = (key, binding)
        return binding

    def _run(self, ids: np.ndarray, mask: np.ndarray, first: int, count: int) -> np.ndarray:
        """Run rows [first, first + count) in place; the last position's logits [count, vocab]."""
        binding = self._binding(first, count)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        # A view of the output ORT owns: `logits` stacks (copies) it before the next run.
        return binding.get_outputs()[-1].numpy()[:, -1]

    def logits(self, batch: list[Sequence_]) -> np.ndarray:
        self._evict()
        rows: dict[int, np.ndarray] = {}
        # One decode step for every sequence already in a slot.
        if self.rows:
            n = len(self.rows)
            ids = np.asarray([[seq.generated[-1]] for seq in self.rows], dtype=np.int64)
            mask = np.zeros((n, max(self.lengths) + 1), dtype=np.int64)
            for r, length in enumerate(self.lengths):
                mask[r, : length + 1] = 1
            for seq, row in zip(self.rows, self._run(ids, mask, 0, n), strict=True):
                rows[id(seq)] = row
            self.lengths = [length + 1 for length in self.lengths]
        # Prefill each new sequence alone, straight into the next free slot.
        for seq in batch:
            if seq.state is not None:
                continue
            if len(self.rows) == self.slots:
                self._grow(max(4, 2 * self.slots))
            n = len(seq.prompt)
            ids = np.asarray([seq.prompt], dtype=np.int64)
            rows[id(seq)] = self._run(ids, np.ones((1, n), np.int64), len(self.rows), 1)[0]
            seq.state = self
            self.rows.append(seq)
            self.lengths.append(n)
        return np.stack([rows[id(seq)] for seq in batch])

    def _evict(self) -> None:
        """Free the slots of sequences that left: the last row moves into each."""
        r = 0
        while r < len(self.rows):
            if self.rows[r].state is self:
                r += 1
                continue
            last = len(self.rows) - 1
            if r != last:
                for buf in self.cache:
                    buf[r] = buf[last]
                self.rows[r], self.lengths[r] = self.rows[last], self.lengths[last]
            self.rows.pop()
            self.lengths.pop()

    def release(self, seq: Sequence_) -> None:
        seq.state = None  # the next step frees its slot

    def close(self) -> None:
        self.rows, self.cache = [], []
        del self.session


class OnnxDecoder:
    """format onnx: sequences that fit the model's sliding window (all of
    them for models without one) step together in `BatchedOnnxDecoder`;
    longer ones run on onnxruntime-genai's own generator (`OgaDecoder`),
    which slides the window. Graphs the batcher does not know run all on
    onnxruntime-genai."""

    def __init__(self, folder: Path, *, device: str, threads: int, spinning: bool = False) -> None:
        self._folder, self._device, self._threads = folder, device, threads
        self._oga: OgaDecoder | None = None
        self.batched: BatchedOnnxDecoder | None = None
        if not device.startswith("cuda"):
            try:
                self.batched = BatchedOnnxDecoder(folder, threads=threads, spinning=spinning)
            except (UnsupportedGraph, KeyError) as exc:
                log.warning("%s: no batched decoding (%s); one generator per sequence", folder, exc)
        if self.batched is None:
            self._oga = OgaDecoder(folder, device=device, threads=threads)
        info = self.batched or self._oga
        assert info is not None
        self.device = info.device
        self.context_length = info.context_length
        self.architecture = info.architecture
        self.quantization = info.quantization

    @property
    def oga(self) -> OgaDecoder:
        """onnxruntime-genai's generator, loaded on the first sequence that needs
        it (a second copy of the weights in memory from then on)."""
        if self._oga is None:
            self._oga = OgaDecoder(self._folder, device=self._device, threads=self._threads)
        return self._oga

    def logits(self, batch: list[Sequence_]) -> np.ndarray:
        batched = self.batched
        if batched is None:
            return self.oga.logits(batch)
        together = [s for s in batch if s.state is batched or (s.state is None and batched.fits(s))]
        alone = [
            s for s in batch if not (s.state is batched or (s.state is None and batched.fits(s)))
        ]
        rows: dict[int, np.ndarray] = {}
        if together:
            rows.update(zip(map(id, together), batched.logits(together), strict=True))
        if alone:
            rows.update(zip(map(id, alone), self.oga.logits(alone), strict=True))
        return np.stack([rows[id(s)] for s in batch])

    def release(self, seq: Sequence_) -> None:
        seq.state = None

    def close(self) -> None:
        if self.batched is not None:
            self.batched.close()
        if self._oga is not None:
            self._oga.close()


class UnsupportedGraph(Exception):
    """The ONNX graph is not the model builder's GQA decoder this batches."""


class OgaDecoder:
    """onnxruntime-genai: one ``og.Generator`` per sequence (any model the
    library runs; the fallback when `BatchedOnnxDecoder` cannot batch it)."""

    def __init__(self, folder: Path, *, device: str, threads: int) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise ModelLoadError(
                "onnxruntime-genai is not installed (pip install 'terrace[llm]')"
            ) from exc
        self.og = og
        raw = json.loads((folder / "genai_config.json").read_text())
        filename = raw.get("model", {}).get("decoder", {}).get("filename", "model.onnx")
        try:
            config = og.Config(str(folder))
            config.clear_providers()
            want_cuda = device.startswith("cuda") or device == "auto"
            if want_cuda and og.is_cuda_available():
                config.append_provider("cuda")
                self.device = "cuda:0"
            else:
                if device.startswith("cuda"):
                    log.warning("CUDA requested but onnxruntime-genai has no CUDA; using CPU")
                self.device = "cpu"
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError/OgaException
            raise ModelLoadError(f"onnxruntime-genai cannot load {folder}: {exc}") from exc
        self.context_length = int(raw.get("model", {}).get("context_length") or 2048)
        self.architecture = str(raw.get("model", {}).get("type", "unknown"))
        self.quantization = _onnx_precision(folder / filename)

    def logits(self, batch: list[Sequence_]) -> np.ndarray:
        rows = []
        for seq in batch:
            if seq.state is None:
                params = self.og.GeneratorParams(self.model)
                params.set_search_options(max_length=self.context_length)
                seq.state = self.og.Generator(self.model, params)
                seq.state.append_tokens(np.asarray(seq.prompt, dtype=np.int32))
            else:
                seq.state.append_tokens(np.asarray(seq.generated[-1:], dtype=np.int32))
            rows.append(np.asarray(seq.state.get_logits(), dtype=np.float32).reshape(-1))
        return np.stack(rows)

    def release(self, seq: Sequence_) -> None:
        seq.state = None

    def close(self) -> None:
        del self.model


def _onnx_precision(path: Path) -> str:
    """int4 when the graph has MatMulNBits nodes (the model builder's int4)."""
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        return "none"
    return "int4" if any(n.op_type == "MatMulNBits" for n in graph.node) else "none"


@dataclass
class _Rows:
    """A sequence's KV cache as plain tensors: per layer [1, kv_heads, length, head]."""

    keys: list[Any]
    values: list[Any]
    length: int


class TransformersDecoder:
    """transformers ``AutoModelForCausalLM`` with a KV cache per sequence.

    Every running sequence decodes in **one batch**: each step its cache is
    left-padded to the longest, the batch runs with an attention mask that
    hides the padding and each row's own position ids (as transformers'
    batched generation does), and each row keeps the un-padded part of the
    result. New sequences are prefilled alone. Sequences longer than a
    sliding window (Gemma 3: 512), where transformers starts dropping old
    tokens from those layers, decode one by one on transformers' own cache.
    """

    def __init__(self, folder: Path, *, device: str, threads: int) -> None:
        try:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
        except ImportError as exc:
            raise ModelLoadError(
                "transformers and torch are needed for format torch (pip install 'terrace[llm]')"
            ) from exc
        self.torch, self.DynamicCache = torch, DynamicCache
        self.device = torch_device(torch, device, threads)
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            dtype = torch.bfloat16 if self.device != "cpu" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True
            ).to(self.device)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"transformers cannot load {folder}: {exc}") from exc
        self.model.eval()
        # transformers 5 names the KV cache `cache` (`past_key_values` before),
        # and `logits_to_keep=1` projects only the last position onto the vocabulary.
        params = inspect.signature(self.model.forward).parameters
        self._cache = "cache" if "cache" in params else "past_key_values"
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.window = int(getattr(config, "sliding_window", 0) or 0)
        self.context_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.architecture = str(getattr(config, "model_type", "unknown"))
        self.quantization = "none"

    def fits(self, seq: Sequence_) -> bool:
        """Batched while the whole sequence stays inside the sliding window."""
        return not self.window or len(seq.prompt) + seq.params.max_tokens < self.window

    def _forward(self, ids: Any, cache: Any, **extra: Any) -> Any:
        return self.model(
            input_ids=ids, use_cache=True, **{self._cache: cache}, **self._keep, **extra
        )

    def _to_cache(self, keys: list[Any], values: list[Any]) -> Any:
        cache = self.DynamicCache(config=self.model.config)
        for layer, k, v in zip(cache.layers, keys, values, strict=True):
            layer.update(k, v)
        return cache

    def logits(self, batch: list[Sequence_]) -> np.ndarray:
        torch = self.torch
        rows: dict[int, Any] = {}
        with torch.inference_mode():
            together = [s for s in batch if isinstance(s.state, _Rows)]
            if together:
                rows.update(self._batched_step(together))
            for seq in batch:
                if seq.state is None:  # prefill alone
                    result = self._forward(torch.tensor([seq.prompt], device=self.device), None)
                    cache = result[self._cache]
                    if self.fits(seq):
                        layers = cache.layers
                        seq.state = _Rows(
                            [layer.keys for layer in layers],
                            [layer.values for layer in layers],
                            len(seq.prompt),
                        )
                    else:
                        seq.state = cache
                    rows[id(seq)] = result.logits[0, -1]
                elif not isinstance(seq.state, _Rows):  # too long to batch: alone
                    ids = torch.tensor([seq.generated[-1:]], device=self.device)
                    result = self._forward(ids, seq.state)
                    seq.state = result[self._cache]
                    rows[id(seq)] = result.logits[0, -1]
        return np.stack([rows[id(s)].float().cpu().numpy() for s in batch])

    def _batched_step(self, seqs: list[Sequence_]) -> dict[int, Any]:
        torch = self.torch
        states: list[_Rows] = [s.state for s in seqs]  # type: ignore[misc]
        width = max(st.length for st in states)
        pad = torch.nn.functional.pad

        def stacked(per_row: list[Any]) -> Any:
            return torch.cat(
                [
                    pad(t, (0, 0, width - st.length, 0))
                    for t, st in zip(per_row, states, strict=True)
                ]
            )

        layers = len(states[0].keys)
        cache = self._to_cache(
            [stacked([st.keys[i] for st in states]) for i in range(layers)],
            [stacked([st.values[i] for st in states]) for i in range(layers)],
        )
        mask = torch.zeros((len(seqs), width + 1), dtype=torch.long, device=self.device)
        for r, st in enumerate(states):
            mask[r, width - st.length :] = 1
        result = self._forward(
            torch.tensor([[s.generated[-1]] for s in seqs], device=self.device),
            cache,
            attention_mask=mask,
            position_ids=torch.tensor([[st.length] for st in states], device=self.device),
            cache_position=torch.tensor([width], device=self.device),
        )
        out = {}
        for r, (seq, st) in enumerate(zip(seqs, states, strict=True)):
            start = width - st.length
            seq.state = _Rows(
                [layer.keys[r : r + 1, :, start:] for layer in cache.layers],
                [layer.values[r : r + 1, :, start:] for layer in cache.layers],
                st.length + 1,
            )
            out[id(seq)] = result.logits[r, -1]
        return out

    def release(self, seq: Sequence_) -> None:
        seq.state = None

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()
