# Flow Pins — the two commands of the README are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: run demo sandbox test mutate lint fmt bench messages clean install install-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev]'
	@touch $@

$(VENV)/.test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[test]'
	@touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-test: $(VENV)/.test

## run: the web server and a Celery worker (plus a private Redis when REDIS_URL is unset)
run: $(VENV)/.runtime
	$(BIN)/python -m devtools run

## demo: `run` plus the simulated Bitrix24 portal
demo: $(VENV)/.runtime
	$(BIN)/python -m devtools demo

## sandbox: the simulated Bitrix24 portal alone
sandbox: $(VENV)/.runtime
	$(BIN)/python -m sandbox

## test: the whole suite (services tests use DATABASE_URL / REDIS_URL when set)
test: $(VENV)/.test
	$(BIN)/python -m pytest --cov --cov-report= $(PYTEST_ARGS)

## mutate: mutation testing of the verification, token and convergence modules (prints the
## score; needs PostgreSQL and Redis like `test`)
mutate: $(VENV)/.test
	$(BIN)/python -m devtools.mutate

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DEBUG=1 $(BIN)/mypy b24app flows sandbox devtools
	$(BIN)/hadolint Dockerfile

fmt: $(VENV)/.test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: the benchmarks in bench/ (needs PostgreSQL and Redis, like CI)
bench: $(VENV)/.test
	$(BIN)/python -m bench

# The catalogs the app ships (locale/<name>; settings.LANGUAGES lists the same languages).
LOCALES := ru uk de es pt_BR pl

## messages: refresh every catalog after changing texts, then compile them (needs gettext)
messages: $(VENV)/.runtime
	DEBUG=1 $(BIN)/python manage.py makemessages $(addprefix -l ,$(LOCALES)) --ignore=.venv \
		--ignore=sandbox --ignore=tests --ignore=bench --ignore=devtools
	for l in $(LOCALES); do \
		msgfmt --check -o locale/$$l/LC_MESSAGES/django.mo locale/$$l/LC_MESSAGES/django.po \
			|| exit 1; \
	done

clean:
	rm -rf $(VENV) var staticfiles mutants
