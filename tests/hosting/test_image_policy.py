"""The host's image limits (backend/hosting/policy.py): flags, environment, hosted defaults, and the count check."""

from __future__ import annotations

import argparse

import pytest

from backend.hosting import HostingError, HostPolicy, add_hosting_flags
from backend.hosting.limits import check_image_count
from backend.hosting.policy import HostedDefaults


def policy(argv: list[str], env: dict | None = None) -> HostPolicy:
    args = add_hosting_flags(argparse.ArgumentParser()).parse_args(argv)
    return HostPolicy.from_env_and_flags(args, env or {})


def test_local_has_no_image_caps_and_hosted_has_the_defaults():
    local = policy([])
    assert (local.max_images_per_request, local.max_image_pixels, local.max_image_bytes) == (None, None, None)
    assert local.allowed_image_domains == ()
    hosted = policy(["--hosted"])
    d = HostedDefaults()
    assert hosted.max_images_per_request == d.max_images_per_request
    assert hosted.max_image_pixels == d.max_image_pixels and hosted.max_image_bytes == d.max_image_bytes
    assert any("images per request: 4" in line for line in hosted.summary())


def test_flags_win_over_the_environment():
    env = {"FLAB_MAX_IMAGE_PIXELS": "500", "FLAB_ALLOWED_IMAGE_DOMAINS": "a.org", "FLAB_MAX_IMAGES_PER_REQUEST": "2"}
    p = policy(["--max-image-pixels", "100", "--allowed-image-domains", "Img.Example.com., b.org"], env)
    assert p.max_image_pixels == 100 and p.max_images_per_request == 2
    assert p.allowed_image_domains == ("img.example.com", "b.org")
    assert policy(["--hosted", "--max-image-bytes", "none"]).max_image_bytes is None


@pytest.mark.parametrize("bad", [["--max-image-pixels", "0"], ["--max-image-bytes", "lots"]])
def test_bad_values_name_the_flag(bad):
    with pytest.raises(HostingError, match="max_image|--max-image"):
        policy(bad)


def test_a_domain_must_be_a_host_name():
    with pytest.raises(HostingError, match="not a host name"):
        HostPolicy(allowed_image_domains=("https://a.org/x",))


def test_image_count():
    check_image_count(HostPolicy(max_images_per_request=2), 2)
    with pytest.raises(HostingError, match="3 images in one request; this host allows at most 2"):
        check_image_count(HostPolicy(max_images_per_request=2), 3)
    with pytest.raises(HostingError, match="text only"):
        check_image_count(HostPolicy(max_images_per_request=0), 1)
