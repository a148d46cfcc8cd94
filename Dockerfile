# One image, two roles: the web server (default command) or the Celery worker
# (`celery -A b24app worker ...`, see compose.yaml). No secret is baked in: every
# setting comes from the environment at run time. The app only: the simulated portal
# (sandbox/), the dev tooling (devtools/), the benchmarks and the tests stay out.

FROM python:3.11-slim AS build
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml constraints.txt ./
COPY b24app ./b24app
COPY flows ./flows
RUN python -m venv /venv \
    && /venv/bin/pip install -c constraints.txt .

FROM python:3.11-slim AS runtime
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=b24app.settings \
    FLOWPINS_VAR_DIR=/tmp/flowpins \
    PORT=8000
RUN useradd --create-home --uid 10001 app
WORKDIR /app
COPY --from=build /venv /venv
COPY manage.py ./
COPY b24app ./b24app
COPY flows ./flows
COPY templates ./templates
COPY locale ./locale
# collectstatic needs settings but no real secret: random throwaway values, generated for this
# one command (start-up refuses published placeholders outside DEBUG).
RUN DEBUG=0 B24_CLIENT_ID=x B24_CLIENT_SECRET=x ALLOWED_HOSTS=localhost \
    B24_APP_BASE_URL=https://build.invalid \
    SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(50))')" \
    B24_TOKEN_KEY="$(python -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')" \
    python manage.py collectstatic --noinput -v0
USER 10001
EXPOSE 8000
# GET http://127.0.0.1:$PORT/healthz with a Host from ALLOWED_HOSTS (Django refuses 127.0.0.1
# there); /healthz is exempt from the https redirect.
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD ["python", "-m", "b24app.probe"]
CMD ["sh", "-c", "exec gunicorn b24app.wsgi --bind 0.0.0.0:${PORT} --workers 3 --threads 4 --access-logfile -"]
