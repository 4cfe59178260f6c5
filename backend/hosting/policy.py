"""What a host allows: `HostPolicy`, built once at start-up from flags and the environment.

The hosted rule: the app or server is *hosted* (visitors are strangers) when any of these holds
  - it runs on a Hugging Face Space (the environment variable SPACE_ID is set),
  - it listens on a non-loopback address (`--host 0.0.0.0`, `--host ::`, a LAN address, a host name other
    than localhost; GRADIO_SERVER_NAME counts as the app's --host),
  - `--hosted` or FLAB_HOSTED=1 is given.
`--not-hosted` / FLAB_HOSTED=0 turns it off (e.g. a container bound to 0.0.0.0 behind a private port).

Hosted, the defaults are the safe ones below; not hosted (a loopback address: only this machine's user),
nothing is capped and any local folder loads. Remote code is off in both unless the host allows it.

    flag                          env                          hosted default       not hosted
    --hosted / --not-hosted       FLAB_HOSTED                  (the rule above)
    --allow-remote-code           FLAB_ALLOW_REMOTE_CODE       off                  off
    --remote-code-repos A,B       FLAB_REMOTE_CODE_REPOS       (any, once allowed)  (any, once allowed)
    --allowed-dirs D1:D2          FLAB_ALLOWED_DIRS            HF cache + project cache (replaced when given)
    --max-new-tokens N            FLAB_MAX_NEW_TOKENS          512                  no cap
    --max-prompt-tokens N         FLAB_MAX_PROMPT_TOKENS       4096                 no cap
    --max-parallel-per-visitor N  FLAB_MAX_PARALLEL_PER_VISITOR 4                   no cap
    --queue-size N                FLAB_QUEUE_SIZE              16 (per event)       no cap
    --max-visitor-models N        FLAB_MAX_VISITOR_MODELS      1                    no cap
    --allow-benchmark             FLAB_ALLOW_BENCHMARK         off (host only)      on
    --check-memory/--no-...       FLAB_CHECK_MEMORY            on                   on
    --max-body-bytes N            FLAB_MAX_BODY_BYTES          1 MiB                8 MiB
    --max-images-per-request N    FLAB_MAX_IMAGES_PER_REQUEST  4                    no cap (the engine's 16)
    --max-image-pixels N          FLAB_MAX_IMAGE_PIXELS        4194304 (2048^2)     no cap (the engine's 50 M)
    --max-image-bytes N           FLAB_MAX_IMAGE_BYTES         1 MiB                no cap (the body limit)
    --allowed-image-domains A,B   FLAB_ALLOWED_IMAGE_DOMAINS   none                 none
                                  (image_url http(s) URLs are fetched only from these hosts; see
                                  backend/server/images.py)
    --api-key KEY                 FLAB_API_KEY                 none                 none
    --public-health/--no-...      FLAB_HEALTH_PUBLIC           off                  on
    --public-metrics/--no-...     FLAB_METRICS_PUBLIC          off                  on
    --forwarded-allow-ips A,NET   FLAB_FORWARDED_ALLOW_IPS     none                 none
                                  (or uvicorn's FORWARDED_ALLOW_IPS; see backend/hosting/proxies.py)

A flag wins over its environment variable. A cap of 0 for --max-visitor-models means visitors use the
host's model only; "none" (or a negative number) for any cap means no cap. On a Space, set secrets (the
API key) and variables (the rest) in the Space's settings: both arrive as environment variables.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from backend.hosting.errors import HostingError
from backend.hosting.proxies import DEFAULT_TRUSTED_PROXIES, check_trusted_proxies

TRUE = ("1", "true", "yes", "on", "t", "y")
FALSE = ("0", "false", "no", "off", "f", "n")
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
MIB = 1024 * 1024
IMAGE_CAPS = ("max_images_per_request", "max_image_pixels", "max_image_bytes")


@dataclass(frozen=True)
class HostedDefaults:
    """The caps a hosted app gets when the host sets none."""

    max_new_tokens: int = 512
    max_prompt_tokens: int = 4096
    max_parallel_per_visitor: int = 4
    queue_size: int = 16
    max_visitor_models: int = 1
    max_body_bytes: int = 1 * MIB
    max_images_per_request: int = 4
    max_image_pixels: int = 2048 * 2048
    max_image_bytes: int = 1 * MIB


LOCAL_MAX_BODY_BYTES = 8 * MIB  # not hosted: a bound against mistakes, not against strangers


@dataclass(frozen=True)
class HostPolicy:
    """What visitors may do. `None` for a cap means no cap. Built by `from_env_and_flags` (or directly in tests)."""

    hosted: bool = False
    allow_remote_code: bool = False  # the host's decision; a visitor's trust_remote_code is ignored
    remote_code_repos: tuple[str, ...] | None = None  # with allow_remote_code: only these (None: any)
    allowed_dirs: tuple[Path, ...] = ()  # hosted: local folders load only from under these
    max_new_tokens: int | None = None
    max_prompt_tokens: int | None = None
    max_parallel_per_visitor: int | None = None  # sequences a visitor runs at once (n choices count)
    queue_size: int | None = None  # events waiting per Gradio event (demo.queue(max_size=...))
    max_visitor_models: int | None = None  # visitors holding their own loaded model at once (0: host's only)
    allow_benchmark: bool = True  # the Benchmark tab replaces the shared engine
    check_memory: bool = True  # refuse, before any download or allocation, what does not fit the free memory
    # prefix-cache blocks shared across visitors: off when hosted (a visitor could confirm another's prompt block by
    # block through cached_tokens), so each visitor's requests are salted by their owner; the host may share
    share_prefix_cache: bool = True
    max_body_bytes: int | None = LOCAL_MAX_BODY_BYTES  # server request body limit
    api_key: str | None = field(default=None, repr=False)
    health_public: bool = True  # /health without the key
    metrics_public: bool = True  # /metrics without the key
    forwarded_allow_ips: tuple[str, ...] = DEFAULT_TRUSTED_PROXIES  # proxies whose X-Forwarded-For names the visitor
    max_images_per_request: int | None = None  # image parts in one chat request
    max_image_pixels: int | None = None  # width x height of one image (checked from its header, before decoding)
    max_image_bytes: int | None = None  # one image's encoded bytes (a data: URL's decoded payload, a fetched file)
    allowed_image_domains: tuple[str, ...] = ()  # image_url http(s) hosts the server fetches from (none: data: only)

    def __post_init__(self) -> None:
        for name in (
            "max_new_tokens",
            "max_prompt_tokens",
            "max_parallel_per_visitor",
            "queue_size",
            "max_visitor_models",
            "max_body_bytes",
            *IMAGE_CAPS,
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise HostingError(f"{name} must be a whole number >= 0 or None (no cap), got {value!r}")
        for name in (
            "max_new_tokens",
            "max_prompt_tokens",
            "max_parallel_per_visitor",
            "queue_size",
            "max_body_bytes",
            "max_image_pixels",
            "max_image_bytes",
        ):
            if getattr(self, name) == 0:
                raise HostingError(f"{name} must be at least 1 (or None: no cap)")
        domains = tuple(str(d).strip().lower().rstrip(".") for d in self.allowed_image_domains if str(d).strip())
        for d in domains:
            if "/" in d or ":" in d or " " in d:
                raise HostingError(f"allowed_image_domains: {d!r} is not a host name (e.g. images.example.com)")
        object.__setattr__(self, "allowed_image_domains", domains)
        object.__setattr__(self, "forwarded_allow_ips", check_trusted_proxies(self.forwarded_allow_ips, self.hosted))
        if self.api_key is not None and not self.api_key.strip():
            object.__setattr__(self, "api_key", None)

    @classmethod
    def hosted_defaults(cls, **overrides) -> HostPolicy:
        """The policy of a hosted app whose host set nothing (tests and the docs use it)."""
        d = HostedDefaults()
        values = dict(
            hosted=True,
            allowed_dirs=default_allowed_dirs(),
            max_new_tokens=d.max_new_tokens,
            max_prompt_tokens=d.max_prompt_tokens,
            max_parallel_per_visitor=d.max_parallel_per_visitor,
            queue_size=d.queue_size,
            max_visitor_models=d.max_visitor_models,
            allow_benchmark=False,
            check_memory=True,
            share_prefix_cache=False,
            max_body_bytes=d.max_body_bytes,
            max_images_per_request=d.max_images_per_request,
            max_image_pixels=d.max_image_pixels,
            max_image_bytes=d.max_image_bytes,
            health_public=False,
            metrics_public=False,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_env_and_flags(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> HostPolicy:
        """The policy from `args` (parsed with `add_hosting_flags`; `args.host`, `args.api_key` and
        `args.trust_remote_code` are read when the parser has them) and `environ` (default os.environ).
        Raises HostingError for a bad value, naming the flag or variable."""
        env = os.environ if environ is None else environ
        a = args if args is not None else argparse.Namespace()

        def flag(name: str):
            return getattr(a, name, None)

        hosted_flag = flag("hosted")
        if hosted_flag is None:
            hosted_flag = _env_bool(env, "FLAB_HOSTED")
        host = flag("host") or env.get("GRADIO_SERVER_NAME")
        hosted = hosted_flag if hosted_flag is not None else (bool(env.get("SPACE_ID")) or not is_loopback(host))
        base = cls.hosted_defaults() if hosted else cls()

        def cap(name: str, env_name: str) -> int | None:
            given = flag(name)
            if given is None and env.get(env_name, "").strip():
                given = env[env_name]
            if given is None:
                return getattr(base, name)
            return _parse_cap(given, f"--{name.replace('_', '-')} / {env_name}")

        def boolean(name: str, env_name: str, default: bool) -> bool:
            given = flag(name)
            if given is None:
                given = _env_bool(env, env_name)
            return default if given is None else bool(given)

        allow_remote = boolean("allow_remote_code", "FLAB_ALLOW_REMOTE_CODE", False) or bool(flag("trust_remote_code"))
        repos_text = flag("remote_code_repos")
        if repos_text is None:
            repos_text = env.get("FLAB_REMOTE_CODE_REPOS")
        repos = _split_list(repos_text, ",") if repos_text is not None else None
        dirs_text = flag("allowed_dirs")
        if dirs_text is None:
            dirs_text = env.get("FLAB_ALLOWED_DIRS")
        dirs = (
            tuple(Path(os.path.expandvars(d)).expanduser() for d in _split_list(dirs_text, os.pathsep))
            if dirs_text
            else base.allowed_dirs
        )
        api_key = flag("api_key") or env.get("FLAB_API_KEY") or None
        proxies_text = flag("forwarded_allow_ips")
        for env_name in ("FLAB_FORWARDED_ALLOW_IPS", "FORWARDED_ALLOW_IPS"):  # ours first, then uvicorn's
            if proxies_text is None:
                proxies_text = env.get(env_name)
        proxies = tuple(_split_list(proxies_text, ",")) if proxies_text is not None else base.forwarded_allow_ips
        domains_text = flag("allowed_image_domains")
        if domains_text is None:
            domains_text = env.get("FLAB_ALLOWED_IMAGE_DOMAINS")
        domains = tuple(_split_list(domains_text, ",")) if domains_text is not None else base.allowed_image_domains
        return replace(
            base,
            allow_remote_code=allow_remote,
            remote_code_repos=tuple(repos) if repos else None,
            allowed_dirs=dirs,
            max_new_tokens=cap("max_new_tokens", "FLAB_MAX_NEW_TOKENS"),
            max_prompt_tokens=cap("max_prompt_tokens", "FLAB_MAX_PROMPT_TOKENS"),
            max_parallel_per_visitor=cap("max_parallel_per_visitor", "FLAB_MAX_PARALLEL_PER_VISITOR"),
            queue_size=cap("queue_size", "FLAB_QUEUE_SIZE"),
            max_visitor_models=cap("max_visitor_models", "FLAB_MAX_VISITOR_MODELS"),
            max_body_bytes=cap("max_body_bytes", "FLAB_MAX_BODY_BYTES"),
            allow_benchmark=boolean("allow_benchmark", "FLAB_ALLOW_BENCHMARK", base.allow_benchmark),
            check_memory=boolean("check_memory", "FLAB_CHECK_MEMORY", base.check_memory),
            share_prefix_cache=boolean("share_prefix_cache", "FLAB_SHARE_PREFIX_CACHE", base.share_prefix_cache),
            api_key=api_key,
            health_public=boolean("public_health", "FLAB_HEALTH_PUBLIC", base.health_public),
            metrics_public=boolean("public_metrics", "FLAB_METRICS_PUBLIC", base.metrics_public),
            forwarded_allow_ips=proxies,
            max_images_per_request=cap("max_images_per_request", "FLAB_MAX_IMAGES_PER_REQUEST"),
            max_image_pixels=cap("max_image_pixels", "FLAB_MAX_IMAGE_PIXELS"),
            max_image_bytes=cap("max_image_bytes", "FLAB_MAX_IMAGE_BYTES"),
            allowed_image_domains=domains,
        )

    def engine_options(self) -> dict:
        """EngineConfig options that follow from the policy (pass as Engine(..., **policy.engine_options())): the
        per-visitor cap becomes the scheduler's per-owner cap on running sequences (requests carry owner=visitor),
        and unless the host shares the prefix cache, each owner's requests share prefix blocks only with its own."""
        options: dict = {} if self.share_prefix_cache else {"prefix_cache_per_owner": True}
        if self.max_parallel_per_visitor is not None:
            options["max_running_per_owner"] = self.max_parallel_per_visitor
        return options

    def summary(self) -> list[str]:
        """One line per setting, for the start-up log and the app's About box (the key itself is not shown)."""

        def show(v) -> str:
            return "no cap" if v is None else str(v)

        remote = "allowed" if self.allow_remote_code else "not allowed"
        if self.allow_remote_code and self.remote_code_repos:
            remote += f" (only {', '.join(self.remote_code_repos)})"
        lines = [
            f"hosted: {'yes' if self.hosted else 'no'}",
            f"remote code: {remote}",
            "local folders: " + (("only under " + ", ".join(map(str, self.allowed_dirs))) if self.hosted else "any"),
            f"max new tokens: {show(self.max_new_tokens)}; max prompt tokens: {show(self.max_prompt_tokens)}",
            f"parallel sequences per visitor: {show(self.max_parallel_per_visitor)}; queue per event: "
            f"{show(self.queue_size)}; visitors with their own model: {show(self.max_visitor_models)}",
            f"benchmark: {'anyone' if self.allow_benchmark else 'host only'}; memory check: "
            f"{'on' if self.check_memory else 'off'}; prefix cache: "
            f"{'shared by all visitors' if self.share_prefix_cache else 'per visitor'}",
            f"API key: {'set' if self.api_key else 'none'}; /health "
            f"{'public' if self.health_public else 'needs the key'}; /metrics "
            f"{'public' if self.metrics_public else 'needs the key'}; body limit {show(self.max_body_bytes)} bytes",
            f"images per request: {show(self.max_images_per_request)}; pixels per image: "
            f"{show(self.max_image_pixels)}; bytes per image: {show(self.max_image_bytes)}; image URLs fetched from: "
            + (", ".join(self.allowed_image_domains) or "no domain (data: URLs only)"),
            "API clients: told apart by address; X-Forwarded-For trusted from "
            + (", ".join(self.forwarded_allow_ips) or "no proxy"),
        ]
        if self.hosted and not self.api_key:
            lines.append("warning: hosted without an API key: anyone who reaches the port can use the API")
        return lines


def default_allowed_dirs() -> tuple[Path, ...]:
    """The Hugging Face cache and the project's cache (backend/paths.py), read from the environment now."""
    from backend import paths
    from backend.loading.hub_common import hub_cache_dir

    return (hub_cache_dir(), paths.cache_dir())


def is_loopback(host: str | None) -> bool:
    """True for a loopback address or name (127.0.0.0/8, ::1, localhost); None/empty counts as loopback
    (both the app and the server default to 127.0.0.1). Any other address or name is reachable from outside."""
    if host is None or not str(host).strip():
        return True
    name = str(host).strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves to an outside interface


def add_hosting_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The hosting flags (see the module docstring), in their own group. `--api-key` is added unless the parser
    has it already; `HostPolicy.from_env_and_flags(args)` reads them. Flags left unset are None, so the
    environment and the hosted defaults apply."""
    g = parser.add_argument_group(
        "hosting (a Space, a non-loopback --host, or --hosted: safe defaults; see backend/hosting/policy.py)"
    )
    g.add_argument(
        "--hosted", dest="hosted", action="store_const", const=True, default=None,
        help="treat visitors as strangers (env FLAB_HOSTED=1); default: on a Space or a non-loopback --host",
    )  # fmt: skip
    g.add_argument(
        "--not-hosted", dest="hosted", action="store_const", const=False,
        help="local rules even on a non-loopback --host (env FLAB_HOSTED=0)",
    )  # fmt: skip
    g.add_argument(
        "--allow-remote-code", action="store_const", const=True, default=None,
        help="let models that ship their own Python code run it on this machine (env FLAB_ALLOW_REMOTE_CODE)",
    )  # fmt: skip
    g.add_argument(
        "--remote-code-repos", default=None, metavar="ID,ID",
        help="with --allow-remote-code: only these Hub ids (env FLAB_REMOTE_CODE_REPOS)",
    )  # fmt: skip
    g.add_argument(
        "--allowed-dirs", default=None, metavar=f"DIR{os.pathsep}DIR",
        help="hosted: local model folders load only from under these (env FLAB_ALLOWED_DIRS; "
        "default: the Hugging Face cache and the project cache)",
    )  # fmt: skip
    caps = (
        ("--max-new-tokens", "FLAB_MAX_NEW_TOKENS", "output tokens per request", HostedDefaults.max_new_tokens),
        ("--max-prompt-tokens", "FLAB_MAX_PROMPT_TOKENS", "prompt tokens per request",
         HostedDefaults.max_prompt_tokens),
        ("--max-parallel-per-visitor", "FLAB_MAX_PARALLEL_PER_VISITOR", "sequences one visitor runs at once",
         HostedDefaults.max_parallel_per_visitor),
        ("--queue-size", "FLAB_QUEUE_SIZE", "events waiting per app event", HostedDefaults.queue_size),
        ("--max-visitor-models", "FLAB_MAX_VISITOR_MODELS", "visitors with their own loaded model (0: the host's only)",
         HostedDefaults.max_visitor_models),
        ("--max-body-bytes", "FLAB_MAX_BODY_BYTES", "API request body bytes", HostedDefaults.max_body_bytes),
        ("--max-images-per-request", "FLAB_MAX_IMAGES_PER_REQUEST", "images in one chat request",
         HostedDefaults.max_images_per_request),
        ("--max-image-pixels", "FLAB_MAX_IMAGE_PIXELS", "pixels (width x height) per image",
         HostedDefaults.max_image_pixels),
        ("--max-image-bytes", "FLAB_MAX_IMAGE_BYTES", "encoded bytes per image", HostedDefaults.max_image_bytes),
    )  # fmt: skip
    for option, env_name, what, hosted_default in caps:
        g.add_argument(
            option, default=None, metavar="N",
            help=f"cap on {what} (env {env_name}; hosted default {hosted_default}, else none; 'none': no cap)",
        )  # fmt: skip
    g.add_argument(
        "--allowed-image-domains", default=None, metavar="HOST,HOST",
        help="image_url http(s) URLs are fetched from these hosts only, never from private or loopback addresses "
        "(env FLAB_ALLOWED_IMAGE_DOMAINS; default none: data: URLs only)",
    )  # fmt: skip
    g.add_argument(
        "--allow-benchmark", action=argparse.BooleanOptionalAction, default=None,
        help="visitors may run the Benchmark tab (env FLAB_ALLOW_BENCHMARK; hosted default: host only)",
    )  # fmt: skip
    g.add_argument(
        "--share-prefix-cache", action=argparse.BooleanOptionalAction, default=None,
        help="visitors share prefix-cache blocks, e.g. the host's common system prompt (env FLAB_SHARE_PREFIX_CACHE; "
        "hosted default: off, each visitor's requests are salted by the visitor, as vLLM's cache_salt)",
    )  # fmt: skip
    g.add_argument(
        "--check-memory", action=argparse.BooleanOptionalAction, default=None,
        help="refuse models (weights + the KV budget asked + the load peak) that do not fit the free memory before "
        "downloading or allocating (env FLAB_CHECK_MEMORY; default on)",
    )  # fmt: skip
    g.add_argument(
        "--public-health", action=argparse.BooleanOptionalAction, default=None,
        help="/health without the API key (env FLAB_HEALTH_PUBLIC; hosted default off)",
    )  # fmt: skip
    g.add_argument(
        "--public-metrics", action=argparse.BooleanOptionalAction, default=None,
        help="/metrics without the API key (env FLAB_METRICS_PUBLIC; hosted default off)",
    )  # fmt: skip
    g.add_argument(
        "--forwarded-allow-ips", default=None, metavar="ADDR,NET",
        help="the proxies in front of the API (addresses or networks, e.g. 10.0.0.0/8): through them the client's "
        "address is read from X-Forwarded-For (env FLAB_FORWARDED_ALLOW_IPS or FORWARDED_ALLOW_IPS; default "
        "none, loopback included: name 127.0.0.1 for a proxy on this machine)",
    )  # fmt: skip
    try:
        g.add_argument(
            "--api-key", default=None,
            help="require 'Authorization: Bearer <key>' on the API (env FLAB_API_KEY; on a Space: a secret)",
        )  # fmt: skip
    except argparse.ArgumentError:
        pass  # the parser has its own --api-key; from_env_and_flags reads args.api_key all the same
    return parser


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    value = env.get(name, "").strip().lower()
    if not value:
        return None
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise HostingError(f"{name}={env[name]!r}: use 1/true/yes/on or 0/false/no/off")


def _parse_cap(value, where: str) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value < 0 else value
    text = str(value).strip().lower()
    if text in ("none", "off", "unlimited", ""):
        return None
    try:
        number = int(text.replace("_", ""))
    except ValueError:
        raise HostingError(f"{where}: {value!r} is not a whole number (or 'none' for no cap)") from None
    return None if number < 0 else number


def _split_list(text: str, sep: str) -> list[str]:
    return [part.strip() for part in str(text).split(sep) if part.strip()]
