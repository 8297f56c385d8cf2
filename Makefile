# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both create or update the project's virtual environment from uv.lock first.
PYTHON ?= python3
VENV   := .venv
UV     := .tools/bin/uv
UV_VERSION := 0.13.9
export UV_PYTHON_DOWNLOADS := never

.PHONY: venv demo test clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --extra dev --python $(PYTHON)
	touch $@

venv: $(VENV)/.synced

demo: venv
	$(VENV)/bin/m2f demo $(ARGS)

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) .tools
