"""Configuration: one typed object, read from ``SWITCHBOARD_*`` environment variables.

Defaults are the embedded, loopback-only set-up that ``make run`` starts: no external service, no
API key.  Secrets are ``SecretStr`` so they never print in logs or reprs.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.segmenter import SegmenterConfig

ProviderName = Literal["pocketsphinx", "null", "assemblyai", "deepgram"]


class PlanConfig(BaseModel):
    """One plan a customer may subscribe to: its Stripe prices and the minutes it includes."""

    model_config = ConfigDict(extra="forbid")
    price_id: str = Field(min_length=1, max_length=255)
    metered_price_id: str | None = Field(None, min_length=1, max_length=255)
    included_minutes: int = Field(0, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    log_level: str = "INFO"
    # `serve` runs this many server processes on the one port (api/workers.py); 1 = this process alone.
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    # Set by `serve --workers` on each of its workers (never by hand): this process is worker i of a
    # parent that holds the data directory; see own_dir and lock_dir.
    worker_index: int | None = Field(None, ge=0, le=255)

    # Telnyx media streams
    # The bootstrap organisation's first media token (Telnyx's stream_auth_token), for deployments
    # configured by environment; registered at start-up when storage is on (api/auth.py).  Streams
    # without a known token are refused: tokens are per organisation (POST /api/media-tokens).
    telnyx_stream_token: SecretStr | None = None
    # An admin API key of the bootstrap organisation (must start with "sbk_"), registered likewise;
    # with storage off, the only API credential.
    bootstrap_api_key: SecretStr | None = None
    org_settings_cache_s: float = Field(30.0, ge=0)  # an organisation's speech policy is re-read this often
    media_token_cache_s: float = Field(30.0, ge=0)  # a known media token is re-checked this often (api/auth.py)
    metrics_token: SecretStr | None = None  # Bearer for /api/stats (besides admins): a scraper's credential
    max_message_bytes: int = Field(65536, ge=1024)  # larger WebSocket messages close with 1009
    reorder_window: int = Field(4, ge=0, le=64)  # sequenced frames held to restore order
    max_streams: int = Field(2000, ge=1)  # calls streaming at once (slots taken at `start`); more: 1013
    # Upgraded sockets that have not sent `start` yet, in total and per remote address; more: 503.
    media_max_pending: int = Field(512, ge=1)
    media_max_pending_per_address: int = Field(64, ge=1)
    media_start_timeout_s: float = Field(5.0, gt=0)  # upgrade -> `start`, else closed 1008
    media_idle_timeout_s: float = Field(10.0, gt=0)  # no media for this long ends the call (idle_timeout)
    dtmf_per_s: float = Field(10.0, gt=0)  # DTMF events published per call and second; more: counted, dropped
    dtmf_burst: int = Field(20, ge=1)
    shutdown_grace_s: float = Field(20.0, gt=0)  # SIGTERM: live calls drain their owed finals within this

    # VAD segmenter
    vad_aggressiveness: int = Field(2, ge=0, le=3)
    vad_start_voiced: int = Field(6, ge=1)
    vad_start_window: int = Field(10, ge=1)
    vad_hangover_ms: int = Field(500, ge=20)
    vad_preroll_ms: int = Field(200, ge=0)
    vad_max_utterance_ms: int = Field(15_000, ge=200)

    # Speech-to-text.  stt_chain maps a call language to providers in fallback order ("*" = any
    # other language), e.g. {"en": ["assemblyai", "deepgram", "pocketsphinx"], "es": ["deepgram"]};
    # empty = stt_provider alone.  An organisation's settings JSON may override it ("stt_chain").
    stt_provider: ProviderName = "pocketsphinx"
    stt_chain: dict[str, list[ProviderName]] = Field(default_factory=dict)
    stt_breaker_failures: int = Field(3, ge=1)  # consecutive failures that open a provider's circuit
    stt_breaker_cooldown_s: float = Field(30.0, gt=0)  # then one trial session after this long
    assemblyai_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_ASSEMBLYAI_API_KEY", "ASSEMBLYAI_API_KEY"))
    assemblyai_url: str = "wss://streaming.assemblyai.com/v3/ws"
    deepgram_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_DEEPGRAM_API_KEY", "DEEPGRAM_API_KEY"))
    deepgram_url: str = "wss://api.deepgram.com/v1/listen"
    languages: list[str] = Field(default_factory=lambda: ["en", "es"])  # accepted in ?language= on the stream

    # Translation of final transcripts.  "auto": openai when an API key is set, else apertium when
    # installed, else none.
    translation_provider: Literal["auto", "none", "apertium", "openai"] = "auto"
    translate_to: dict[str, str] = Field(default_factory=lambda: {"en": "es", "es": "en"})
    openai_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_OPENAI_API_KEY", "GROQ_API_KEY", "OPENAI_API_KEY"))
    openai_base_url: str = "https://api.groq.com/openai/v1"
    openai_model: str = "llama-3.1-8b-instant"
    translation_deadline_s: float = Field(5.0, gt=0)  # from the final transcript; late = reported failure
    translation_concurrency: int = Field(4, ge=1)
    translation_max_pending: int = Field(200, ge=1)  # past it the oldest waiting job is shed (reported)

    # PII: transcripts are redacted before translation, storage, the bus and logs, always.  SSE shows
    # agents the redacted text unless this is false (per organisation: settings JSON "sse_redacted").
    sse_redacted: bool = True
    # Decoder processes per language model (32-118 MB each); decoding is CPU-bound: one per core.
    stt_max_decoders: int = Field(default_factory=lambda: max(1, len(os.sched_getaffinity(0))), ge=1)  # usable cores
    stt_workers: int = Field(2, ge=1)  # threads for blocking set-up: LM builds, decoder process starts
    stt_queue_max_s: float = Field(120.0, gt=0)  # audio of finals waiting for a decoder, all calls; past it: stt.failed
    stt_phrases_file: Path | None = None  # one phrase per line: the domain language model
    stt_max_buffer_ms: int = Field(30_000, ge=1000)  # audio a session may hold while behind

    # Server-sent events
    sse_history: int = Field(1000, ge=10)  # replayable events kept per call
    sse_client_buffer: int = Field(256, ge=8)  # undelivered final events per client before it is cut
    sse_heartbeat_s: float = Field(15.0, gt=0)
    sse_retry_ms: int = Field(2000, ge=100)
    sse_max_calls: int = Field(10_000, ge=1)  # call channels kept (live plus recently ended)
    sse_retention_s: float = Field(600.0, ge=0)  # how long an ended call's history stays replayable

    # WebRTC sessions of agent browsers (api/webrtc.py).  No ICE servers by default: nothing is asked
    # of the internet; a deployment behind NAT lists its STUN/TURN URLs here.
    webrtc_ice_servers: list[str] = Field(default_factory=list)  # e.g. ["stun:stun.example.com:3478"]
    webrtc_host_addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1"])  # host candidates offered
    webrtc_max_sessions: int = Field(200, ge=1)
    # Offers per principal (a token bucket each): a flood by one identity is 429, others unaffected.
    webrtc_offers_per_s: float = Field(1.0, gt=0)
    webrtc_offer_burst: int = Field(10, ge=1)
    # Offer answered -> ICE and DTLS connected, or the session ends (aioice alone retries ~63 s).
    webrtc_connect_timeout_s: float = Field(15.0, gt=0)
    webrtc_jitter_ms: int = Field(100, ge=20, le=1000)  # audio held per bridge direction; past it the oldest goes
    stats_enabled: bool = True  # GET /api/stats (loopback deployments; the benchmark reads it)

    # HTTP doors (api/middleware.py, api/connections.py, api/sse.py): what one client may hold.
    # Host headers served, e.g. ["switchboard.example.com"] (see api/middleware.py for the forms).
    # Empty: the loopback names when bound to loopback, else any host (warned at start-up).
    allowed_hosts: list[str] = Field(default_factory=list)
    http_header_timeout_s: float = Field(10.0, gt=0)  # accept -> first request's headers complete, else 408
    http_max_pending_per_address: int = Field(256, ge=1)  # connections per address before their first request
    http_keepalive_timeout_s: float = Field(75.0, gt=0)  # between requests on a keep-alive connection
    http_body_timeout_s: float = Field(15.0, gt=0)  # headers complete -> whole body read, else 408 and close
    sse_max_pending: int = Field(1000, ge=1)  # SSE subscribers waiting for calls that have not started
    sse_max_pending_per_address: int = Field(100, ge=1)  # ... of them from one client address
    sse_max_per_principal: int = Field(50, ge=1)  # event streams one user or API key holds open at once; more: 429
    # Peers the per-address caps do not apply to: a reverse proxy on this host speaks for all its clients
    # (deploy/nginx.conf); limit per client there.  The total caps still apply.
    per_address_exempt: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    # Reverse proxies whose X-Forwarded-For is believed (addresses or networks, e.g. ["127.0.0.1"] behind
    # deploy/nginx.conf): the client's address then comes from it (api/middleware.py ClientAddress).
    # Empty: the header is ignored.
    trusted_proxies: list[str] = Field(default_factory=list)
    sse_write_timeout_s: float = Field(30.0, gt=0)  # an SSE write not draining this long cuts the client
    sse_send_buffer_bytes: int = Field(65536, ge=0)  # SO_SNDBUF of SSE sockets (0: the OS's own)

    # Soft delete (api/lifecycle.py): a deleted account, campaign, call or user may be restored this long.
    restore_window_days: int = Field(30, ge=1, le=3650)
    # Retention (storage/retention.py): the server runs the job this often (0: never; run it from the
    # deployment's scheduler instead, `switchboard retention run`), its first run one interval after start.
    retention_interval_s: float = Field(21600.0, ge=0)
    retention_batch: int = Field(500, ge=1, le=10000)  # rows per statement
    # Hot to cold (storage/archive.py): calls ended this long ago keep their transcripts and translations
    # in the cold tier only (an organisation's 'archive' policy overrides; 0: never).
    archive_after_days: int = Field(90, ge=0)
    evidence_retain_days: int = Field(2555, ge=730)  # an evidence bundle's retain_until (7 years by default)
    # Heavy jobs one organisation may run at once; one more is 429 + Retry-After (api/exports.py: queued or
    # running on any node, each holds a database connection for its cursor).
    exports_per_org: int = Field(2, ge=1)
    # ... on this node (api.rest.OrgSlots): evidence seals and verifies (each copies and hashes up to 1 GiB
    # of recordings), and erasures (one at a time: two of one person would both count what they erased).
    evidence_per_org: int = Field(2, ge=1)
    erasures_per_org: int = Field(1, ge=1)
    # REST API (api/rest.py, api/auth_api.py): limits in the warm tier, 1-minute windows.
    rate_read_per_min: int = Field(600, ge=1)  # GET requests per credential and route
    rate_write_per_min: int = Field(120, ge=1)  # POST/PATCH/DELETE per credential and route
    # POST /api/voice/call per credential: each placement costs money and rings a stranger's phone, so a
    # stolen or runaway credential gets far less than the write rate (api/voice_api.py).
    calls_place_per_min: int = Field(30, ge=1)
    login_per_address_per_min: int = Field(10, ge=1)  # login attempts per client address (not per_address_exempt)
    login_per_account_per_min: int = Field(10, ge=1)  # login attempts per e-mail address
    login_lockout_failures: int = Field(5, ge=1)  # wrong passwords for one address within login_lockout_s ...
    login_lockout_s: int = Field(900, ge=1)  # ... lock it (even the right password) for this long
    recording_url_max_s: int = Field(3600, ge=1, le=3600)  # longest life of a recording download URL

    # Storage tiers.  Unset URLs start the embedded default (see storage/embedded.py) under data_dir.
    persist: bool = True  # False: the real-time path only, nothing stored (benchmarks, some tests)
    data_dir: Path = Path(".switchboard")
    database_url: SecretStr | None = Field(None, validation_alias=AliasChoices("SWITCHBOARD_DATABASE_URL",
                                                                               "DATABASE_URL"))
    # The app's own connection (role switchboard_app).  Unset: database_url with that user and
    # database_app_password.  database_url itself is used only to migrate.
    database_app_url: SecretStr | None = Field(None, validation_alias=AliasChoices("SWITCHBOARD_DATABASE_APP_URL",
                                                                                   "DATABASE_APP_URL"))
    database_app_password: SecretStr | None = None
    database_name: str = "switchboard"  # the embedded server's database
    db_pool_max: int = Field(10, ge=1)
    migrate_on_start: bool = True
    redis_url: SecretStr | None = Field(None, validation_alias=AliasChoices("SWITCHBOARD_REDIS_URL", "REDIS_URL"))
    s3_endpoint_url: str | None = Field(None, validation_alias=AliasChoices("SWITCHBOARD_S3_ENDPOINT_URL",
                                                                            "S3_ENDPOINT_URL"))
    s3_bucket: str = "switchboard-recordings"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_S3_ACCESS_KEY_ID", "S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"))
    s3_secret_access_key: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_S3_SECRET_ACCESS_KEY", "S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"))
    # S3 server-side encryption of every object (storage/blobs.py): "auto" = AES256 (SSE-S3) when the store
    # takes it and says so, else none (warned); "AES256" / "aws:kms" = that, or refuse to start; "off".
    s3_sse: Literal["auto", "off", "AES256", "aws:kms"] = "auto"
    s3_sse_kms_key_id: str | None = Field(None, min_length=1, max_length=2048)  # aws:kms only; unset: the default key
    # Evidence bundles locked in the store until their retain_until (S3 Object Lock): "governance" or
    # "compliance" need a bucket with Object Lock (a missing one is created with it; one without: no start).
    s3_object_lock: Literal["off", "governance", "compliance"] = "off"
    # Key for the embedded store's signed download URLs; unset = random per process (URLs die with it).
    blob_signing_key: SecretStr | None = None
    # Encryption at rest (storage/crypto.py): {"<key id>": "<base64 of 32 bytes>"}, and the active id.
    encryption_keys: SecretStr | None = None
    encryption_key_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,32}$")
    public_base_url: str = ""  # prefix of signed download URLs ("" = relative to this server)
    writer_max_items: int = Field(20_000, ge=100)  # records buffered while PostgreSQL is slow or down
    writer_batch: int = Field(200, ge=1)
    recording_enabled: bool = True
    recording_max_s: int = Field(4 * 3600, ge=10)  # per track; audio past it is counted, not stored
    recording_uploads: int = Field(4, ge=1)  # concurrent uploads to the cold tier
    bus_enabled: bool = True  # transcript and call events also go to Redis Streams (other nodes)
    relay_max_calls: int = Field(1000, ge=1)  # other nodes' calls relayed to SSE clients here at once
    bus_buffer: int = Field(10_000, ge=100)  # events waiting for Redis; past it the oldest is dropped, counted

    # Crash recovery and supervision of the tiers (api/recovery.py, api/supervisor.py, api/readiness.py).
    # node_id names this node in calls.node_id: on start-up the node closes the calls it left open.
    # Unset: the host name and a hash of the data directory, stable across restarts and distinct for
    # two nodes on one host (each has its own data directory).
    node_id: str = Field(default_factory=lambda data: _default_node_id(data["data_dir"]), min_length=1,
                         max_length=64)
    supervise_interval_s: float = Field(1.0, gt=0)  # how often embedded PostgreSQL and Valkey are checked
    supervise_backoff_max_s: float = Field(30.0, gt=0)  # longest wait between two restart attempts
    readiness_timeout_s: float = Field(1.0, gt=0)  # per tier check of GET /readyz
    readiness_cache_s: float = Field(1.0, ge=0)  # a check's result serves every /readyz for this long
    # Node liveness across nodes (api/heartbeat.py, migration 0019): every server process beats its row
    # in the `nodes` table every node_heartbeat_s (the database's clock); the sweeper on any live node
    # closes the open calls of a node whose beat is older than node_dead_s as failed/node_lost and tells
    # their viewers on the bus.  A dead node's calls are closed within node_dead_s + sweep_interval_s.
    # node_dead_s must be at least 3 beats, so that one late or failed beat never declares a node lost.
    node_heartbeat_s: float = Field(5.0, gt=0, le=300)
    node_dead_s: float = Field(30.0, gt=0, le=86_400)

    @field_validator("node_dead_s")
    @classmethod
    def _dead_after_three_beats(cls, v: float, info: ValidationInfo) -> float:
        beat = info.data.get("node_heartbeat_s")
        if beat is not None and v < 3 * beat:
            raise ValueError(f"node_dead_s ({v:g}) must be at least 3 x node_heartbeat_s ({beat:g})")
        return v

    # Billing (api/billing.py).  Plans: JSON {"name": {"price_id", "metered_price_id"?, "included_minutes"}}.
    stripe_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_STRIPE_API_KEY", "STRIPE_API_KEY"))
    stripe_webhook_secret: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_STRIPE_WEBHOOK_SECRET", "STRIPE_WEBHOOK_SECRET"))
    stripe_api_url: str = "https://api.stripe.com"
    stripe_webhook_tolerance_s: int = Field(300, ge=1, le=3600)
    resend_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_RESEND_API_KEY", "RESEND_API_KEY"))
    resend_api_url: str = "https://api.resend.com"
    billing_email_from: str = "Switchboard billing <billing@switchboard.invalid>"
    billing_plans: dict[str, PlanConfig] = Field(default_factory=dict)
    billing_outbox_interval_s: float = Field(10.0, gt=0)  # the outbox is drained this often (and when woken)

    # Placing calls through Telnyx Call Control (api/telnyx_calls.py).
    telnyx_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_TELNYX_API_KEY", "TELNYX_API_KEY"))
    telnyx_public_key: str | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_TELNYX_PUBLIC_KEY", "TELNYX_PUBLIC_KEY"))  # base64 of the 32-byte Ed25519 key
    telnyx_connection_id: str | None = Field(None, validation_alias=AliasChoices(
        "SWITCHBOARD_TELNYX_CONNECTION_ID", "TELNYX_CONNECTION_ID"))
    telnyx_api_url: str = "https://api.telnyx.com"
    telnyx_webhook_tolerance_s: int = Field(300, ge=1, le=3600)
    # Derives each placed call's media credential (sbc_...); unset: random per process (warned), so a
    # call placed before a restart, or by another node, cannot stream to this one.
    call_token_key: SecretStr | None = None

    # After the call (api/post_call.py): Telnyx's recording fetched (api/recording_fetch.py), then
    # every stored recording transcribed.  The recording URL must be https on one of these hosts
    # ("*.suffix": any name under it) and resolve only to public addresses, except networks listed in
    # recording_fetch_allow_networks (empty: none; for a test server on loopback).
    recording_fetch_hosts: list[str] = Field(default_factory=lambda: [
        "s3.amazonaws.com", "*.s3.amazonaws.com", "*.telnyx.com"])
    recording_fetch_allow_networks: list[str] = Field(default_factory=list)
    recording_fetch_ca_file: str | None = None  # extra CA bundle for the recording host (tests)
    recording_fetch_max_bytes: int = Field(512 << 20, ge=1 << 10)  # 4 h of 8 kHz stereo WAV is 461 MB
    recording_fetch_timeout_s: float = Field(300.0, gt=0)  # the whole download
    # Batch transcription of stored recordings: "auto" = AssemblyAI when ASSEMBLYAI_API_KEY is set, else
    # the local recogniser; "off" = none.
    batch_stt: Literal["auto", "assemblyai", "local", "off"] = "auto"
    assemblyai_batch_url: str = "https://api.assemblyai.com"
    batch_max_s: int = Field(3600, ge=10)  # longer recordings are not transcribed (reported); memory 2 x 2 x rate
    batch_timeout_s: float = Field(1800.0, gt=0)  # one recording's whole transcription
    post_call_workers: int = Field(1, ge=1, le=16)  # jobs run at once on a node
    post_call_attempts: int = Field(6, ge=1, le=50)  # then the job is failed (reported, audited)
    post_call_interval_s: float = Field(5.0, gt=0)  # the job table is polled this often (and when woken)
    post_call_lease_s: float = Field(2400.0, gt=0)  # a running job not finished by then is taken again
    # The call's summary and score (pipelines/summary_engine.py): "auto" = the OpenAI-compatible model
    # (openai_base_url, GROQ_API_KEY / OPENAI_API_KEY) when a key is set, else the offline rules; "llm"
    # without a key refuses to start.  Only redacted text is sent; any failure stores the offline result.
    summary: Literal["auto", "offline", "llm"] = "auto"  # SWITCHBOARD_SUMMARY: the engine
    summary_model: str | None = Field(None, min_length=1, max_length=100)  # unset: openai_model
    summary_timeout_s: float = Field(30.0, gt=0, le=600)  # one call's whole exchange, retries and waits included
    summary_max_retries: int = Field(2, ge=0, le=10)  # after 408/409/429/5xx or a failed connection
    summary_retry_after_max_s: float = Field(10.0, ge=0, le=60)  # a longer Retry-After: the offline result

    # The sweeper (api/sweeper.py): placed calls left open by silent webhooks, imports left by a dead node.
    sweep_interval_s: float = Field(30.0, gt=0, le=3600)  # a sweep this often on every node (and one at start)
    sweep_batch: int = Field(100, ge=1, le=10_000)  # rows closed per statement; at most 10 statements per kind
    # No progress for this long closes a placed call no node streams as failed/no_webhook.  initiating: keep
    # it well above the create-call request's 10 s timeout; ringing: Telnyx rings at most 600 s (timeout_secs),
    # plus a minute; ending: Telnyx confirms a hang-up in seconds.
    sweep_initiating_s: float = Field(120.0, ge=1, le=86_400)
    sweep_ringing_s: float = Field(660.0, ge=1, le=86_400)
    sweep_ending_s: float = Field(120.0, ge=1, le=86_400)
    # A running import whose heartbeat (beaten every quarter of this) is older is failed as interrupted.
    sweep_import_stale_s: float = Field(120.0, ge=1, le=86_400)

    @field_validator("bootstrap_api_key")
    @classmethod
    def _api_key_form(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and (not v.get_secret_value().startswith("sbk_") or len(v.get_secret_value()) < 24):
            raise ValueError("bootstrap_api_key must start with 'sbk_' and be at least 24 characters")
        return v

    @field_validator("s3_sse_kms_key_id")
    @classmethod
    def _kms_key_with_kms(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("s3_sse") != "aws:kms":
            raise ValueError("s3_sse_kms_key_id is for SWITCHBOARD_S3_SSE=aws:kms only")
        return v

    @field_validator("node_id")
    @classmethod
    def _printable_node_id(cls, v: str) -> str:
        if not v.isprintable() or v != v.strip():
            raise ValueError("node_id must be printable, without leading or trailing blanks")
        return v

    @property
    def own_dir(self) -> Path:
        """This process's own files (spool, post-call work): the data directory, or, for worker i >= 1
        of ``serve --workers``, ``<data_dir>/workers/w<i>``.  Worker 0 keeps the data directory's own
        places, so a one-process run and worker 0 are the same node (same node_id, same spool)."""
        if not self.worker_index:
            return self.data_dir.resolve()
        return self.data_dir.resolve() / "workers" / f"w{self.worker_index}"

    @property
    def lock_dir(self) -> Path:
        """Where this process's ``DataDirLock`` lives: the data directory, or, for a worker (whose
        parent holds that one), ``<data_dir>/workers/w<i>``: one live process per worker slot."""
        if self.worker_index is None:
            return self.data_dir.resolve()
        return self.data_dir.resolve() / "workers" / f"w{self.worker_index}"

    def segmenter(self) -> SegmenterConfig:
        return SegmenterConfig(
            aggressiveness=self.vad_aggressiveness,
            start_voiced=self.vad_start_voiced,
            start_window=self.vad_start_window,
            hangover_ms=self.vad_hangover_ms,
            preroll_ms=self.vad_preroll_ms,
            max_utterance_ms=self.vad_max_utterance_ms,
        )

    def phrases(self) -> tuple[str, ...]:
        if self.stt_phrases_file is None:
            return ()
        lines = self.stt_phrases_file.read_text(encoding="utf-8").splitlines()
        return tuple(line.strip() for line in lines if line.strip())


def _default_node_id(data_dir: Path) -> str:
    """The host name and a hash of the data directory: the same at every start of this node."""
    host = "".join(c for c in socket.gethostname() if c.isprintable() and not c.isspace())[:48] or "node"
    return f"{host}-{hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]}"
