# xray_ct_reg developer entry points. ROS 2 processes always run in a loopback-only network
# namespace (scripts/ros_sandbox.sh) with their own ROS_DOMAIN_ID.
.PHONY: bootstrap test demo lint

VENV   := .venv
PY     := $(VENV)/bin/python
SANDBOX := scripts/ros_sandbox.sh

bootstrap:
	bash scripts/bootstrap.sh

test:
	bash scripts/bootstrap.sh && $(SANDBOX) $(PY) -m pytest -q test

demo: bootstrap
	$(SANDBOX) $(VENV)/bin/xray-ct-reg demo

lint: bootstrap
	$(VENV)/bin/ruff check xray_ct_reg test bench launch
