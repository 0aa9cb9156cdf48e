"""All configuration, from environment variables, validated once at start-up.

Every field here is an environment variable of the same name in upper case
(``kafka_topic`` is ``KAFKA_TOPIC``); the README's configuration table lists them.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MiB = 1024 * 1024


def _split_list(value: object, *, pathsep: bool = False) -> object:
    """Accept ``a,b`` strings (and ``a:b`` for paths) as well as real lists."""
    if isinstance(value, str):
        chunks = value.split(",")
        if pathsep:
            chunks = [p for chunk in chunks for p in chunk.split(os.pathsep)]
        return [p.strip() for p in chunks if p.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- Kafka -----------------------------------------------------------------------------
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_topic: str = "image-uploaded"
    kafka_group_id: str = "ingest-worker"
    kafka_dlq_topic: str = "image-uploaded.dlq"
    kafka_client_id: str = "imgsearch"
    # Production-safe defaults; tests against Tansu lower the poll interval (see DEVELOPERS.md).
    kafka_max_poll_interval_ms: int = Field(300_000, ge=1000)
    kafka_session_timeout_ms: int = Field(45_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100)
    kafka_assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = (
        "cooperative-sticky"
    )

    # --- Vector store ----------------------------------------------------------------------
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    qdrant_path: Path | None = None
    qdrant_collection: str = Field("images", pattern=r"^[A-Za-z0-9_\-]{1,128}$")
    qdrant_timeout_s: float = Field(10.0, gt=0)
    # Collection layout (docs/scaling.md): applied when the collection is created, compared
    # with the existing collection on every open. Unset: Qdrant's own default, not checked.
    # Shards and replicas are fixed at creation (a different value refuses to start);
    # write consistency, on-disk storage and HNSW can be changed in place (a warning says how).
    qdrant_shards: int | None = Field(None, ge=1, le=1024)
    qdrant_replication_factor: int | None = Field(None, ge=1, le=16)
    # Replicas that must confirm a write before Qdrant answers; at most the replication factor.
    qdrant_write_consistency: int | None = Field(None, ge=1, le=16)
    # Per-request ordering of writes between the replicas of a shard: weak (Qdrant's
    # default), medium (through the shard's elected leader), strong (through a fixed leader).
    qdrant_write_ordering: Literal["weak", "medium", "strong"] = "weak"
    qdrant_on_disk_vectors: bool | None = None
    qdrant_on_disk_payload: bool | None = None
    qdrant_hnsw_m: int | None = Field(None, ge=4, le=128)
    qdrant_hnsw_ef_construct: int | None = Field(None, ge=4, le=4096)

    @model_validator(mode="after")
    def _consistency_within_replicas(self) -> Settings:
        factor, replicas = self.qdrant_write_consistency, self.qdrant_replication_factor
        if factor and replicas and factor > replicas:
            raise ValueError(
                f"QDRANT_WRITE_CONSISTENCY={factor} exceeds QDRANT_REPLICATION_FACTOR={replicas}: "
                "every write would fail; set it to at most the replication factor"
            )
        return self
    # --- end of collection layout ------------------------------------------------------------

    # --- Vectors: reduction and quantization -----------------------------------------------
    # Fixed when a collection is created and stored with it; reopening it with other values
    # is an error (see docs/quality.md for what each costs and saves).
    # random: a seeded random orthogonal projection to VECTOR_DIM (VECTOR_DIM = the model's
    # dimension is a rotation, which binary quantization needs). pca: principal axes fitted
    # on gallery vectors; creating such a collection needs VECTOR_REDUCTION_FILE (written by
    # `imgsearch eval DATASET --variants pca:N --save-reductions DIR`); later opens read
    # the projection from the collection itself.
    vector_reduction: Literal["none", "random", "pca"] = "none"
    vector_dim: int | None = Field(None, ge=1)
    vector_reduction_seed: int = Field(0, ge=0)
    vector_reduction_file: Path | None = None
    # Qdrant quantization of the stored vectors; the float32 originals are kept for
    # rescoring. Query-time: rescore OVERSAMPLING x limit candidates with the originals
    # (unset: 4 for binary, Qdrant's default of 1 for int8).
    quantization: Literal["none", "int8", "binary"] = "none"
    quantization_rescore: bool = True
    quantization_oversampling: float | None = Field(None, ge=1.0, le=100.0)
    # Segments whose vectors pass this many KB get their HNSW index and quantized copy when
    # optimized. Unset: Qdrant's default (10 MB). Small collections below it are searched
    # exactly with float32 vectors, whatever QUANTIZATION says.
    vector_indexing_threshold_kb: int | None = Field(None, ge=1)

    # --- Model -----------------------------------------------------------------------------
    model_name: str = "resnet50"
    model_weights: Path | None = None
    # false builds the architecture with random weights: for speed measurements only.
    model_pretrained: bool = True
    device: str = "auto"
    channels_last: bool = True
    # Mixed precision for the forward pass: auto = bf16 on CUDA GPUs that support it,
    # else fp16 on CUDA, off on CPU (this CPU class has no fast bf16).
    embed_amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    torch_compile: bool = False
    torch_threads: int = Field(0, ge=0, le=512)  # 0: one per core

    # --- Batching --------------------------------------------------------------------------
    batch_size: int = Field(32, ge=1, le=4096)
    batch_max_wait_ms: int = Field(200, ge=0, le=60_000)
    # A batch stops growing once its messages hold this many bytes (inline images are big).
    batch_max_bytes: int = Field(256 * MiB, ge=1024)

    # --- Fetching and decoding -------------------------------------------------------------
    image_file_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    fetch_timeout_s: float = Field(10.0, gt=0)
    fetch_max_bytes: int = Field(25 * MiB, ge=1024)
    fetch_max_redirects: int = Field(5, ge=0, le=20)
    fetch_retries: int = Field(3, ge=0, le=20)
    # SSRF guard: http(s) fetches to private/loopback/link-local addresses are refused
    # unless the address falls inside one of these networks (e.g. "127.0.0.1/32").
    fetch_allowed_networks: Annotated[list[IPNetwork], NoDecode] = Field(default_factory=list)
    image_max_pixels: int = Field(40_000_000, ge=1)
    decode_workers: int = Field(default_factory=lambda: max(2, os.cpu_count() or 2), ge=1)

    # --- Worker ----------------------------------------------------------------------------
    store_retry_max_s: float = Field(30.0, gt=0)
    worker_concurrency: int = Field(1, ge=1, le=64)
    # On SIGTERM, in-flight events get this long to be stored and committed.
    worker_shutdown_timeout_s: float = Field(20.0, ge=0)
    # An event in flight for longer than this (or a loop that stops moving) makes the
    # worker unready; twice this, with no outage being waited out, makes it exit non-zero.
    worker_stall_timeout_s: float = Field(300.0, gt=0)
    worker_metrics_host: str = "0.0.0.0"
    worker_metrics_port: int = Field(9100, ge=0, le=65535)  # 0 disables the metrics server
    log_level: str = "INFO"

    # --- Query API -------------------------------------------------------------------------
    api_host: str = "0.0.0.0"
    api_port: int = Field(8000, ge=1, le=65535)
    # Comma-separated. When set, every endpoint that serves data needs one of them (X-API-Key
    # or Authorization: Bearer); the probes, the page, its static files and the API docs stay
    # open (they hold no data). Empty: no authentication.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Request bodies (raw or multipart) are cut off with 413 once they pass this many bytes.
    api_max_upload_bytes: int = Field(10 * MiB, ge=1024)
    api_max_limit: int = Field(100, ge=1, le=10_000)
    api_max_offset: int = Field(10_000, ge=0, le=1_000_000)
    # Dynamic micro-batching of query embeddings: concurrent queries share a forward pass.
    api_batching: bool = True
    api_batch_max_size: int = Field(8, ge=1, le=512)
    api_batch_max_wait_ms: float = Field(4.0, ge=0, le=1000)
    # Threads that decode and preprocess query images (the forward pass has its own thread).
    api_decode_workers: int = Field(default_factory=lambda: max(2, os.cpu_count() or 2), ge=1, le=256)
    # How long POST /images waits for the broker's ack before answering 503.
    api_publish_timeout_s: float = Field(10.0, gt=0, le=300)
    # Run the model once per batch size at start-up, so the first queries are not slow.
    api_warmup: bool = True
    api_thumbnail_cache_size: int = Field(512, ge=0, le=100_000)
    # Thumbnails render on their own threads, never on the pool that store calls use, so a
    # slow source cannot stall /search, /count or /metrics.
    api_thumbnail_workers: int = Field(4, ge=1, le=64)
    # Renders waiting or running at once; past it, thumbnails answer 503 at once instead of
    # queueing behind slow sources.
    api_thumbnail_queue: int = Field(64, ge=1, le=10_000)
    # A thumbnail not ready by then answers 504; it is also its source's fetch deadline.
    api_thumbnail_timeout_s: float = Field(5.0, gt=0, le=120)
    # A source that failed or timed out is not fetched again for this long (same answer).
    api_thumbnail_failure_ttl_s: float = Field(60.0, ge=0, le=86_400)
    # --- HTTP limits (query_api/limits.py, query_api/protocol.py) ---
    # The request line and headers together; more is refused with 431 while they arrive
    # (uvicorn's default parser has no limit at all).
    api_max_header_bytes: int = Field(16 * 1024, ge=1024, le=MiB)
    # A request's headers must be complete this long after the connection opened (or the
    # previous response ended): a client trickling them is answered 408 and closed.
    api_header_timeout_s: float = Field(10.0, gt=0, le=600)
    # A request body must arrive within this (10 MiB in 60 s is 175 KB/s) ...
    api_body_timeout_s: float = Field(60.0, gt=0, le=3600)
    # ... and never pause for longer than this; either answers 408 and frees its memory.
    api_body_idle_timeout_s: float = Field(15.0, gt=0, le=600)
    # An idle keep-alive connection is closed after this.
    api_keepalive_timeout_s: float = Field(5.0, gt=0, le=600)
    # Requests in flight at once (probes and /metrics excluded); more answer 503 overloaded
    # with Retry-After at once, so a burst costs at most this many bodies of memory.
    api_max_concurrent_requests: int = Field(64, ge=1, le=100_000)
    # Open connections at once; requests on more answer 503 (probes excepted). Idle and slow
    # connections are cheap but not free; a multiple of the request cap leaves room for them.
    api_max_connections: int = Field(256, ge=1, le=1_000_000)
    # Also embed each query image without the model's centre crop and search with the sum
    # of both views: finds the source of cropped or zoomed copies far more often (birds,
    # 60% crops: 0.922 -> 0.99 top-1, docs/quality.md) for a second forward pass per query.
    query_full_frame_view: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            if len(key.get_secret_value()) < 16:
                raise ValueError(
                    "API_KEYS entries must be at least 16 characters (e.g. `openssl rand -hex 24`)"
                )
        return keys

    @model_validator(mode="after")
    def _connections_hold_the_requests(self) -> Settings:
        if self.api_max_connections < self.api_max_concurrent_requests:
            raise ValueError(
                f"API_MAX_CONNECTIONS={self.api_max_connections} is below "
                f"API_MAX_CONCURRENT_REQUESTS={self.api_max_concurrent_requests}: each request "
                "needs a connection; raise it (4 times the request cap is a good start)"
            )
        return self
    # --- end Query API ---------------------------------------------------------------------

    # --- Object detection ------------------------------------------------------------------
    # Optional YOLOv5 cropping before embedding (pip install 'imgsearch[detect]'; AGPL-3.0,
    # see docs/detection.md). "none" keeps the product free of the detector entirely.
    detector: Literal["none", "yolov5"] = "none"
    # A local checkpoint (.pt) or TorchScript export (.torchscript), or a Hugging Face hub
    # repo id ("owner/name") where the hub is reachable.
    detector_weights: str | None = None
    # Full pickle loading runs code from the file: only for a checkpoint you trust that the
    # allow-listed loader refuses (custom modules, unstripped training checkpoints).
    detector_trust_pickle: bool = False
    detector_conf: float = Field(0.25, ge=0.0, le=1.0)
    detector_iou: float = Field(0.45, ge=0.0, le=1.0)
    # Allow-list of class names (COCO for the stock weights); empty keeps every class.
    detector_classes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    detector_img_size: int = Field(640, ge=32, le=4096, multiple_of=32)
    detector_max_det: int = Field(100, ge=1, le=1000)
    # largest: the largest box, or the whole image when nothing is detected.
    # all: every box as its own point, plus the whole image.
    crop_mode: Literal["largest", "all"] = "largest"

    @field_validator("detector_classes", mode="before")
    @classmethod
    def _split_detector_classes(cls, value: object) -> object:
        return _split_list(value)

    @model_validator(mode="after")
    def _detector_needs_weights(self) -> Settings:
        if self.detector != "none" and not self.detector_weights:
            raise ValueError(
                f"DETECTOR={self.detector} needs DETECTOR_WEIGHTS: a local .pt or .torchscript "
                "file (e.g. yolov5n.pt), or a Hugging Face repo id where the hub is reachable"
            )
        return self
    # --- end of object detection -------------------------------------------------------------

    # --- Engines ---------------------------------------------------------------------------
    # Which inference engine runs the model and the detector (docs/engines.md). auto: the
    # fastest one installed for the device, in the measured order of
    # shared/models/choice.py (CPU: onnxruntime, openvino, torch). Every engine gives the
    # same vectors (cosine >= 0.9999, checked before first use), so switching engines never
    # means re-indexing.
    embed_engine: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    detector_engine: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    # Exported models (ONNX) and the engines' compiled caches. Unset:
    # $XDG_CACHE_HOME/imgsearch/engines, else ~/.cache/imgsearch/engines.
    # `imgsearch engines build` fills it ahead of time (Docker images).
    engine_cache_dir: Path | None = None
    # Threads of the engine's forward pass; 0: the measured rule (one per core; idle engine
    # threads sleep, so the decode pool gets the cores when it has work).
    engine_threads: int = Field(0, ge=0, le=512)

    @field_validator("engine_cache_dir", mode="before")
    @classmethod
    def _empty_cache_dir_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def engine_cache_path(self) -> Path:
        """Where exported models are cached (ENGINE_CACHE_DIR or the user cache)."""
        from shared.models.export import default_cache_dir

        return (self.engine_cache_dir or default_cache_dir()).expanduser()
    # --- end of engines --------------------------------------------------------------------

    # --- Re-index ----------------------------------------------------------------------------
    # Changing the model (or reduction, quantization) of a live index: shared/reindex/,
    # docs/migration.md. How often the API and the workers look at the index's pointer and
    # its migration record (to follow a swap, to start or stop dual-writing); 0 never looks
    # (a deployment that never migrates), which also means they never follow a swap.
    reindex_poll_s: float = Field(2.0, ge=0, le=300)
    # Images per page of the backfill's scan of the serving collection (its checkpoint).
    reindex_batch: int = Field(256, ge=1, le=10_000)
    # Images re-embedded per second at most (0: as fast as the pipeline goes), so a
    # backfill leaves room for live traffic.
    reindex_rate: float = Field(0.0, ge=0)
    # The swap's gate: this many images searched with their own stored vector in the new
    # collection, of which at least REINDEX_GATE_MIN must come back first.
    reindex_gate_sample: int = Field(200, ge=1, le=100_000)
    reindex_gate_min: float = Field(0.99, ge=0, le=1)
    # Reconciliation passes (compare old and new, fix the difference) before giving up.
    reindex_reconcile_rounds: int = Field(5, ge=1, le=100)
    # How long `finish` waits after ending dual-writes before it drops the old collection,
    # so every worker has stopped writing to it (at least twice REINDEX_POLL_S).
    reindex_finish_grace_s: float = Field(10.0, ge=0, le=600)
    # The API's /admin/reindex endpoints (status, swap, rollback, finish; start where the
    # process can run the backfill). Off by default; `imgsearch up` turns it on for its
    # loopback API. Behind API_KEYS when keys are set.
    reindex_admin_api: bool = False
    # Kept images (shared/blobs.py): inline uploads carry their bytes only in the event, so
    # ingest keeps a bounded copy to re-embed them later. Unset: <QDRANT_PATH>/imgsearch-blobs
    # with the embedded store, nothing with a Qdrant server (set a directory every worker
    # shares, or s3://bucket/prefix); "off" keeps nothing.
    blob_store: str | None = None
    blob_keep: Literal["inline", "none"] = "inline"
    blob_max_side: int = Field(1024, ge=64, le=16_384)
    blob_jpeg_quality: int = Field(90, ge=50, le=100)

    @field_validator("blob_store", mode="before")
    @classmethod
    def _empty_blob_store_is_unset(cls, value: object) -> object:
        return None if value == "" else value
    # --- end of re-index ---------------------------------------------------------------------

    @field_validator("image_file_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        return _split_list(value, pathsep=True)

    @field_validator("fetch_allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("image_file_roots")
    @classmethod
    def _roots_must_exist(cls, roots: list[Path]) -> list[Path]:
        resolved = []
        for root in roots:
            if not root.is_absolute():
                root = Path.cwd() / root
            if not root.is_dir():
                raise ValueError(f"IMAGE_FILE_ROOTS entry {str(root)!r} is not a directory")
            # Kept as written (absolute): file:// URIs may spell the root either way.
            resolved.append(Path(os.path.normpath(root)))
        return resolved

    @field_validator("qdrant_url", "qdrant_path", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _one_store(self) -> Settings:
        if self.qdrant_url and self.qdrant_path:
            raise ValueError(
                "set either QDRANT_URL (a Qdrant server) or QDRANT_PATH (the embedded store), "
                "not both"
            )
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"DEVICE must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        return self

    @model_validator(mode="after")
    def _vector_encoding(self) -> Settings:
        if self.vector_reduction == "random" and self.vector_dim is None:
            raise ValueError("VECTOR_REDUCTION=random needs VECTOR_DIM (e.g. 320)")
        if self.vector_reduction == "pca" and not (self.vector_dim or self.vector_reduction_file):
            raise ValueError(
                "VECTOR_REDUCTION=pca needs VECTOR_DIM (to open an existing collection) or "
                "VECTOR_REDUCTION_FILE (a fitted projection, to create one)"
            )
        if self.vector_reduction == "none" and (self.vector_dim or self.vector_reduction_file):
            raise ValueError(
                "VECTOR_DIM / VECTOR_REDUCTION_FILE are set but VECTOR_REDUCTION=none; "
                "set VECTOR_REDUCTION=random or pca, or unset them"
            )
        return self

    @property
    def store_location(self) -> str:
        return self.qdrant_url or str(self.embedded_store_path)

    @property
    def embedded_store_path(self) -> Path:
        """Where the embedded store lives when no server URL is configured."""
        return (self.qdrant_path or Path("data")).absolute()


def load_settings(**overrides: object) -> Settings:
    """Read the environment; turn validation failures into one readable ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper() or "settings"
            lines.append(f"  {name}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc
