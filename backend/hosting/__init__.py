"""Safe to host: the host's policy (policy.py) and the checks each face (app, server) runs before it acts.

policy = HostPolicy.from_env_and_flags(args)       # args parsed with add_hosting_flags(parser)
name = check_model_name(name, policy)              # paths.py: Hub ids, built-ins, allowed folders only
trust = check_remote_code(name, requested, policy).trust   # remote_code.py: the host's decision
check_model_fits(name, ModelSettings(...), policy)  # limits.py: before any download
check_request(policy, prompt_tokens=..., max_new_tokens=..., n=...)
with visitors.running(visitor_id, n): ...           # visitors.py: parallel sequences per visitor
app.add_middleware(ApiKeyMiddleware, policy=policy) # api_key.py (+ BodySizeLimitMiddleware)
app.add_middleware(ForwardedClientMiddleware, trusted=policy.forwarded_allow_ips)  # proxies.py: the client address
refuse_zerogpu()                                    # zerogpu.py: at start-up
"""

from backend.hosting.api_key import ApiKeyMiddleware, BodySizeLimitMiddleware, require_api_key
from backend.hosting.errors import HostingError
from backend.hosting.limits import ModelSettings, check_benchmark, check_model_fits, check_request, clamp_request
from backend.hosting.paths import check_model_name, hosted_load_options, is_hub_id
from backend.hosting.policy import HostPolicy, add_hosting_flags, is_loopback
from backend.hosting.proxies import ForwardedClientMiddleware
from backend.hosting.remote_code import RemoteCodeDecision, check_remote_code
from backend.hosting.visitors import ModelSlots, VisitorLimiter
from backend.hosting.zerogpu import on_zerogpu, refuse_zerogpu

__all__ = [
    "ApiKeyMiddleware",
    "BodySizeLimitMiddleware",
    "ForwardedClientMiddleware",
    "HostPolicy",
    "HostingError",
    "ModelSettings",
    "ModelSlots",
    "RemoteCodeDecision",
    "VisitorLimiter",
    "add_hosting_flags",
    "check_benchmark",
    "check_model_fits",
    "check_model_name",
    "hosted_load_options",
    "check_remote_code",
    "check_request",
    "clamp_request",
    "is_hub_id",
    "is_loopback",
    "on_zerogpu",
    "refuse_zerogpu",
    "require_api_key",
]
