# make demo  - run Fovea on a demo node made of network namespaces (root)
# make test  - install what the tests need and run them all (root)
# make manifests - regenerate the chart's generated files and deploy/daemonset.yaml
# make image - build the agent image with podman (docs/install.md); make image-test - run it as the chart does
# make lock  - re-resolve the hashed lock files from pyproject.toml (pip-tools)
.PHONY: demo test unit bootstrap bench manifests image image-test lock clean

bootstrap:
	./scripts/bootstrap

demo: bootstrap
	.venv/bin/fovea demo

test: bootstrap
	.venv/bin/python -m pytest -ra

unit: bootstrap
	.venv/bin/python -m pytest -ra tests/unit

bench: bootstrap
	.venv/bin/python bench/datapath.py

# regenerate what the chart and deploy/daemonset.yaml are made from (agent/k8s/access.py, dashboards, alerts, CRDs)
manifests: bootstrap
	.venv/bin/python scripts/manifests.py

image: bootstrap
	./scripts/image --tag ghcr.io/fovea-dev/fovea:$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image-test: bootstrap
	.venv/bin/python -m pytest -ra tests/e2e/test_image.py

# requirements.lock: what the image installs; requirements-test.lock: the same pins plus the tests'.
# Resolved against the package index alone (no local wheel directories of this machine).
lock:
	python3 -m venv .venv-lock && .venv-lock/bin/pip install -q pip-tools==7.6.2
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock" \
	  .venv-lock/bin/pip-compile -q --generate-hashes --strip-extras --allow-unsafe \
	  --no-emit-find-links --no-emit-index-url --no-emit-trusted-host -o requirements.lock pyproject.toml
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock" \
	  .venv-lock/bin/pip-compile -q --generate-hashes --strip-extras --allow-unsafe \
	  --no-emit-find-links --no-emit-index-url --no-emit-trusted-host --extra test \
	  -c requirements.lock -o requirements-test.lock pyproject.toml
	rm -rf .venv-lock

clean:
	rm -rf .venv .pytest_cache build *.egg-info
