"""Whether a FineTuneJob may run here: the platform's allowlists (`config.Policy`) applied to a spec.

A FineTuneJob must give its author nothing they could not do themselves, yet the operator makes the
Job with its own rights. So everything in a spec that picks code, identity or data is checked
against what the platform team allowed, before any Job exists (the reconcile then writes Failed,
reason NotAllowed, naming the field and what is allowed):

- `spec.image`: the default trainer image or a listed one (any other image is arbitrary code
  holding the job's storage credentials);
- `spec.serviceAccountName`: the platform's trainer ServiceAccount or a listed one (a
  ServiceAccount may carry cloud IAM roles or API rights the author lacks);
- `spec.storage.uri`: the platform's, or under a listed override; the job then writes only under
  `<uri>/<namespace>/<name>/`, never in another namespace's prefix;
- `spec.storage.endpoint` and `spec.storage.credentialsSecret`: the platform's, or listed ones;
- `spec.model.s3`, `spec.data.s3`, `spec.data.validation.s3`: under the namespace's own prefix
  `<platform uri>/<namespace>/` (earlier jobs' outputs), a listed override, or a listed model/data
  prefix.

Secrets a job names for the trainer (tokenSecretRef and the tracking refs) are not checked here:
the operator never learns who wrote a job, and reading a Secret's labels would need `get` on
Secrets, which is their values too. The chart's ValidatingAdmissionPolicy checks them at apply
instead: the API server asks its authorizer whether the requesting user may `get` each named
Secret (charts/finetune-operator/templates/admission-policy.yaml; docs/platform-guide.md says why).

URIs are compared segment by segment: `s3://b/jobs-x` is not under `s3://b/jobs`, and a URI with an
empty, `.` or `..` segment is refused outright (S3 keys are not paths, but clients that join or
normalise them would read something else than was checked).
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api import FineTuneJobSpec
from finetune_operator.config import Allowances, OperatorConfig

REASON = "NotAllowed"
"""Condition reason of a job refused by the platform's policy."""


@dataclass(frozen=True)
class Refusal:
    """Why a job may not run: the spec field and what would be allowed instead."""

    field: str
    message: str


def s3_segments(uri: str) -> tuple[str, list[str]] | None:
    """(bucket, key segments) of an `s3://` URI (a trailing slash ignored), or None when it is not
    one or has an empty, `.` or `..` segment."""
    if not uri.startswith("s3://"):
        return None
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    segments = key.removesuffix("/").split("/") if key.removesuffix("/") else []
    if not bucket or any(s in ("", ".", "..") for s in segments):
        return None
    return bucket, segments


def under(uri: str, prefix: str) -> bool:
    """Whether `uri` is `prefix` or below it, by whole segments."""
    a, b = s3_segments(uri), s3_segments(prefix)
    if a is None or b is None:
        return False
    return a[0] == b[0] and a[1][: len(b[1])] == b[1]


def within(uri: str, prefix: str) -> bool:
    """Whether `uri` is under the job's storage `prefix` (by whole segments for s3://; a plain
    prefix otherwise): where a URI the trainer reports may point (progress reports, the summary)."""
    if prefix.startswith("s3://"):
        return under(uri, prefix) and s3_segments(uri) is not None
    return uri.startswith(prefix.rstrip("/") + "/") and "/../" not in uri


def image_allowed(image: str, allowed: list[str]) -> bool:
    """Whether `image` is one of `allowed`: an exact reference, or `repository:*` for any tag or
    digest of that repository (a tag has no `/`, so `repo:*` never admits `repo:x/../other`)."""
    for entry in allowed:
        if entry.endswith(":*"):
            repo = entry.removesuffix(":*")
            for sep in (":", "@"):
                rest = image.removeprefix(repo + sep)
                if rest != image and rest and "/" not in rest:
                    return True
        elif image == entry:
            return True
    return False


def namespace_prefix(cfg: OperatorConfig, namespace: str) -> str | None:
    """`<storage.uri>/<namespace>/`: where the namespace's jobs write, and may read back."""
    return f"{cfg.storage.uri.rstrip('/')}/{namespace}/" if cfg.storage.uri else None


def _listing(values: list[str]) -> str:
    return ", ".join(values)


def _source_refusal(field: str, uri: str, prefixes: list[str]) -> Refusal | None:
    if s3_segments(uri) is None:
        return Refusal(field, f"{uri!r} has an empty, '.' or '..' segment")
    if any(under(uri, p) for p in prefixes):
        return None
    return Refusal(field, f"{uri!r} is not under an allowed prefix; allowed: {_listing(prefixes) or 'none'}")


def refusal(spec: FineTuneJobSpec, namespace: str, cfg: OperatorConfig) -> Refusal | None:
    """The first thing in `spec` the platform does not allow for a job in `namespace`, or None."""
    allowed: Allowances = cfg.policy.for_namespace(namespace)

    images = [cfg.default_image, *allowed.images]
    if spec.image is not None and not image_allowed(spec.image, images):
        return Refusal("spec.image", f"{spec.image!r} is not an allowed image; allowed: {_listing(images)}")

    accounts = [a for a in (cfg.trainer_service_account, *allowed.service_accounts) if a]
    name = spec.service_account_name
    if name is not None and name != cfg.trainer_service_account and name not in allowed.service_accounts:
        # Without a platform trainer ServiceAccount the pod runs as the namespace's default: say so
        # beside any listed ones.
        choices = [_listing(accounts)] if accounts else []
        if cfg.trainer_service_account is None:
            choices.append("the namespace's default (leave the field unset)")
        return Refusal(
            "spec.serviceAccountName",
            f"{name!r} is not an allowed ServiceAccount; allowed: {', or '.join(choices)}",
        )

    storage = spec.storage
    platform = [cfg.storage.uri] if cfg.storage.uri else []
    if storage.uri is not None:
        # The platform's own uri spelled out, or under a listed override; never below the
        # platform's uri (s3://b/jobs/team-b would put team-a's job in team-b's prefix).
        same = bool(platform) and under(storage.uri, platform[0]) and under(platform[0], storage.uri)
        if not (same or any(under(storage.uri, p) for p in allowed.storage_uris)):
            return Refusal(
                "spec.storage.uri",
                f"{storage.uri!r} is not allowed: jobs store under the platform's storage.uri"
                f" ({_listing(platform) or 'none set'}) as <namespace>/<name>/;"
                f" listed overrides: {_listing(allowed.storage_uris) or 'none'}",
            )

    endpoints = [e for e in (cfg.storage.endpoint, *allowed.endpoints) if e]
    if storage.endpoint is not None and storage.endpoint.rstrip("/") not in [
        e.rstrip("/") for e in endpoints
    ]:
        return Refusal(
            "spec.storage.endpoint",
            f"{storage.endpoint!r} is not an allowed S3 endpoint; allowed: {_listing(endpoints) or 'none'}",
        )

    secrets = [s for s in (cfg.storage.credentials_secret, *allowed.credentials_secrets) if s]
    own = storage.credentials_secret
    if own is not None and own != cfg.storage.credentials_secret and own not in allowed.credentials_secrets:
        return Refusal(
            "spec.storage.credentialsSecret",
            f"{own!r} is not an allowed credentials Secret; allowed: {_listing(secrets) or 'none'}",
        )

    readable = [p for p in (namespace_prefix(cfg, namespace),) if p] + allowed.storage_uris
    model = spec.model.s3
    if model is not None:
        found = _source_refusal("spec.model.s3", model, readable + allowed.model_prefixes)
        if found:
            return found
    data = spec.data
    for field, uri in (
        ("spec.data.s3", data.s3),
        ("spec.data.validation.s3", data.validation.s3 if data.validation else None),
    ):
        if uri is not None:
            found = _source_refusal(field, uri, readable + allowed.data_prefixes)
            if found:
                return found
    return None
