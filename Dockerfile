# The Consistency Manager Service under gunicorn on port 8080, configured from the environment.
# Build: docker build -t consistency-manager-svc .

# Builder: the pinned runtime dependencies (requirements.txt only, no dev tools) in a venv.
FROM python:3.11.17-slim-bookworm AS builder

RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt

# Runtime: the venv and the service's own files, run by an unprivileged numeric user.
FROM python:3.11.17-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# A numeric uid, so Kubernetes' runAsNonRoot can check it; k8s/base runs the pod as the same uid.
RUN useradd --uid 10001 --user-group --no-create-home --no-log-init --shell /usr/sbin/nologin app

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# What the service reads at run time: its modules, gunicorn.conf.py, sql/queries.sql and sql/migrations/, and the
# script of its pages. Owned by root: the service cannot change its own code.
COPY *.py ./
COPY sql/ ./sql/
COPY static/ ./static/
COPY console/ ./console/

USER 10001
EXPOSE 8080

# Exec form, so SIGTERM reaches gunicorn itself; it reads gunicorn.conf.py from this folder.
CMD ["gunicorn", "consistency_manager_svc:app"]
