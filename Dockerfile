# The cluster image of the KubeRay jobs (jobs/*/rayjob.yaml): Ray's own GPU image, of the Ray
# version pyproject.toml pins, with Quarry (quarry-speech) and its `gpu` extra (vLLM) installed.
#
#   make image                       # docker build -t quarry:<version>-ray<ray version>-gpu .
#
# Only what installing the package needs goes in (.dockerignore); jobs/ reach a job as its working
# directory. tests/test_packaging.py lints this file with hadolint.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

# Ray's image runs as its non-root user `ray` (uid 1000, group `users`, gid 100), whose Python is on
# PATH: Quarry is installed into it, as that user. Numeric, so that Kubernetes' runAsNonRoot can
# check it.
USER 1000:100
WORKDIR /home/ray/quarry-src
COPY --chown=1000:100 pyproject.toml README.md ./
# pipeline/configs is a link to configs/: both go in.
COPY --chown=1000:100 configs ./configs
COPY --chown=1000:100 pipeline ./pipeline
RUN pip install --no-cache-dir "./[gpu]" \
 && quarry --version
WORKDIR /home/ray
