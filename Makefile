# make demo  - run Fovea on a demo node made of network namespaces (root)
# make test  - install what the tests need and run them all (root)
# make manifests - regenerate the chart's generated files and deploy/daemonset.yaml
.PHONY: demo test unit bootstrap bench manifests clean

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

clean:
	rm -rf .venv .pytest_cache build *.egg-info
