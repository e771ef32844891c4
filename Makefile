# make demo  - run Fovea on a demo node made of network namespaces (root)
# make test  - install what the tests need and run them all (root)
.PHONY: demo test unit bootstrap bench clean

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

clean:
	rm -rf .venv .pytest_cache build *.egg-info
