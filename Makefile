# `make up` runs the whole stack on embedded defaults; `make test` runs the whole suite.
# Both install what they need into .venv first (scripts/dev.sh does the work; it needs only python3).
.PHONY: up test install

up:
	sh scripts/dev.sh up $(ARGS)

test:
	sh scripts/dev.sh test $(ARGS)

install:
	sh scripts/dev.sh install
