# reqapi - Kubernetes aggregated API server (k8s.wujiuye.com/v1beta1 requests)
# in one standard-library Python file, on a distroless Python runtime.
#
#   docker build -t reqapi:latest .
#
# Base image: distroless Python 3 on Debian 13 (Python 3.13), "nonroot" variant
# (UID/GID 65532, no shell, no package manager). Tags are rebuilt for CVE fixes,
# so for reproducible builds pin the digest of the tag you tested:
#   docker buildx imagetools inspect gcr.io/distroless/python3-debian13:nonroot
#   # or: crane digest gcr.io/distroless/python3-debian13:nonroot
# and replace the line below with
#   FROM gcr.io/distroless/python3-debian13:nonroot@sha256:<digest>
# (keep the tag for readability; the digest wins). Verify the signature with
#   cosign verify gcr.io/distroless/python3-debian13:nonroot \
#     --certificate-oidc-issuer https://accounts.google.com \
#     --certificate-identity keyless@distroless.iam.gserviceaccount.com
FROM gcr.io/distroless/python3-debian13:nonroot

LABEL org.opencontainers.image.title="reqapi" \
      org.opencontainers.image.description="Kubernetes aggregated API server serving k8s.wujiuye.com/v1beta1 requests (read-only resource request recommendations)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/python3-debian13:nonroot"

# Standard library only: a single file, no pip, no build stage. Root-owned and
# read-only for the runtime user.
COPY reqapi.py /app/reqapi.py

# Unbuffered logs; no .pyc writes (the root filesystem is read-only in k8s/).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Numeric user so the kubelet can verify runAsNonRoot without runAsUser
# ("image has non-numeric user (nonroot), cannot verify user is non-root").
USER 65532:65532

# HTTPS only (TLS cert/key come from the mounted Secret). 10250 needs no
# privileges and is open from the control plane on GKE/EKS by default.
EXPOSE 10250

# Exec form: there is no shell in the image, and python must be PID 1 to get
# SIGTERM (reqapi handles it for a graceful shutdown). Flags come from the
# Deployment's args (--cert, --key, --rules, --port, ...).
ENTRYPOINT ["/usr/bin/python3", "/app/reqapi.py"]
