"""What one runtime process knows: settings, metrics, the model once loaded,
and why it is not ready when it is not. Loading runs off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .batching import TensorBatcher
from .cgroup import container_threads
from .generation import ByteDecoder, ByteTokenizer, Decoder, GenerationEngine, Tokenizer
from .language_models import LanguageModel, is_model_folder, load_language_model
from .metrics import CpuPowerModel, RuntimeMetrics
from .models import Backend, ModelInfo, ModelLoadError, load_backend, warmup_inputs
from .quantize import quantize_int8
from .settings import ServeSettings
from .uris import ModelURIError, resolve_model_uri

log = logging.getLogger(__name__)


@dataclass
class RuntimeState:
    settings: ServeSettings
    metrics: RuntimeMetrics
    # One worker thread: the model computes one batch at a time with all the
    # intra-op threads the container may use; more workers would only contend.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="terrace-infer")
    )
    status: Literal["loading", "ready", "failed"] = "loading"
    reason: str = "loading the model"
    backend: Backend | None = None
    info: ModelInfo | None = None
    batcher: TensorBatcher | None = None
    engine: GenerationEngine | None = None
    language_model: LanguageModel | None = None
    model_path: Path | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> RuntimeState:
        energy = CpuPowerModel(settings.watts_per_core) if settings.energy_model == "cpu" else None
        return cls(settings=settings, metrics=RuntimeMetrics(settings.name, energy))

    async def load(self) -> None:
        """Resolve, (quantize,) load, warm up, then start batching. Never raises:
        a failure leaves the process live but not ready, with the reason."""
        loop = asyncio.get_running_loop()
        s = self.settings
        try:
            path = await loop.run_in_executor(
                self.executor,
                lambda: resolve_model_uri(
                    s.model, cache_dir=s.cache_dir, pvc_root=s.pvc_root, sha256=s.sha256
                ),
            )
            if s.quantize == "int8":
                self.reason = "quantizing the model to int8"
                path = await loop.run_in_executor(self.executor, quantize_int8, path, s.cache_dir)
            self.model_path = path
            threads = container_threads(s.threads)
            self.reason = "loading the model"
            if is_model_folder(path):
                await self._load_language_model(path, threads)
            else:
                await self._load_model_file(path, threads)
        except (ModelURIError, ModelLoadError) as exc:
            self._fail(str(exc))
        except Exception as exc:  # anything else is still a load failure, not a crash
            log.exception("unexpected error loading %s", s.model)
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        if self.ready:
            info = self.info
            assert info is not None
            log.info(
                "model %s ready: %s %s on %s, %d threads, quantization=%s, from %s",
                self.name,
                info.format,
                info.task,
                info.device,
                info.threads,
                info.quantization,
                self.model_path,
            )

    async def _load_model_file(self, path: Path, threads: int) -> None:
        """An ONNX or torch model file: a tensor model or a byte-level text model."""
        s = self.settings
        backend = await asyncio.get_running_loop().run_in_executor(
            self.executor,
            lambda: load_backend(
                path,
                fmt=s.format,
                device=s.resolved_device(),
                threads=threads,
                task=s.task,
                quantization=s.quantize,
                spinning=s.spinning,
            ),
        )
        self.backend, self.info = backend, backend.info
        self.reason = "warming up"
        await asyncio.get_running_loop().run_in_executor(self.executor, self._warmup)
        self._start_serving()

    async def _load_language_model(self, path: Path, threads: int) -> None:
        """A model folder: onnxruntime-genai (onnx) or transformers (torch)."""
        loop = asyncio.get_running_loop()
        s = self.settings
        lm = await loop.run_in_executor(
            self.executor,
            lambda: load_language_model(
                path,
                fmt=s.format,
                device=s.resolved_device(),
                threads=threads,
                chat_template=s.chat_template,
                spinning=s.spinning,
            ),
        )
        self.language_model, self.info = lm, lm.info
        self.reason = "warming up"
        self.engine = self._engine(lm.decoder, lm.tokenizer, lm.context_length, sliding=False)
        self.engine.start()
        await self.engine.warm_up(lm.tokenizer.encode("Hello"))
        engine = self.engine
        self.metrics.queue_depth.labels(self.name).set_function(lambda: engine.depth)
        self._mark_ready()

    def _engine(
        self, decoder: Decoder, tokenizer: Tokenizer, context_length: int, *, sliding: bool
    ) -> GenerationEngine:
        s = self.settings
        return GenerationEngine(
            decoder,
            tokenizer=tokenizer,
            context_length=context_length,
            sliding=sliding,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            executor=self.executor,
            metrics=self.metrics,
        )

    def _mark_ready(self) -> None:
        info = self.info
        assert info is not None
        self.metrics.info.labels(
            self.name, info.format, info.task, info.device, info.quantization, str(info.threads)
        ).set(1)
        self.metrics.ready.labels(self.name).set(1)
        self.status, self.reason = "ready", ""

    def _fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason
        log.error("model %s failed to load: %s", self.name, reason)

    def _warmup(self) -> None:
        """First runs allocate arenas and pick kernels; do it before taking traffic."""
        assert self.backend is not None and self.info is not None
        outputs = [o.name for o in self.info.outputs]
        sizes = [1]
        if self.info.batchable and self.settings.max_batch_size > 1:
            sizes.append(self.settings.max_batch_size)
        for size in sizes:
            self.backend.run(warmup_inputs(self.info, size), outputs)

    def _start_serving(self) -> None:
        assert self.backend is not None and self.info is not None
        s, info = self.settings, self.info
        if info.task == "text-generation":
            tokenizer = ByteTokenizer.from_metadata(info.extra["tokenizer"])
            context = int(info.extra["context_length"])
            decoder = ByteDecoder(self.backend.run, tokenizer, context)
            self.engine = self._engine(decoder, tokenizer, context, sliding=True)
            self.engine.start()
        # Raw tensors are served over OIP v2 for every model, text models included.
        self.batcher = TensorBatcher(
            self.backend.run,
            input_names=[i.name for i in info.inputs],
            batchable=info.batchable,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            executor=self.executor,
            metrics=self.metrics,
        )
        self.batcher.start()
        batcher, engine = self.batcher, self.engine
        self.metrics.queue_depth.labels(self.name).set_function(
            lambda: batcher.depth + (engine.depth if engine is not None else 0)
        )
        self._mark_ready()

    async def close(self) -> None:
        self.status, self.reason = "failed", "shutting down"
        self.metrics.ready.labels(self.name).set(0)
        if self.engine is not None:
            await self.engine.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        backend, lm = self.backend, self.language_model
        self.backend = self.language_model = None
        for closable in (backend, lm):
            if closable is not None:
                await asyncio.get_running_loop().run_in_executor(self.executor, closable.close)
        self.executor.shutdown(wait=False, cancel_futures=True)
