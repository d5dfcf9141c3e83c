# pgmfa — build, test, run and benchmark.
#
#   make run      scratch PostgreSQL + demo user + proxy in the foreground
#   make test     every test (installs PostgreSQL 15 when missing)
#   make bench    the benchmark suite (installs pgbouncer when missing)

GO        ?= go
# The binary lives beside its package (ignored by git), so the top level
# holds only the agreed layout.
BIN       := cmd/pgmfa/bin/pgmfa
PGBIN     ?= $(firstword $(wildcard /usr/lib/postgresql/15/bin) $(wildcard /usr/lib/postgresql/*/bin))
TESTFLAGS ?=
BENCHFLAGS ?=
export PATH := $(PATH):/usr/sbin:/sbin

.PHONY: all build test test-short vet generate run bench bench-smoke fuzz deps deps-pg deps-clang deps-bench clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/pgmfa

vet:
	$(GO) vet ./...

# The whole suite. Tests that need root, BPF or PostgreSQL skip with a reason
# elsewhere; under CI=true they must run.
test: deps-pg deps-bench build vet
	$(GO) test -count=1 -timeout 40m $(TESTFLAGS) ./...

# The pure packages alone: fast, no PostgreSQL, no root.
test-short:
	$(GO) test -count=1 -short ./proto/... ./mfa/...

# Long fuzzing runs stay out of `make test` (which replays the seed corpus).
FUZZTIME ?= 2m
fuzz:
	@for pkg in ./proto ./proto/session ./mfa; do \
	  for f in $$($(GO) test -list 'Fuzz.*' $$pkg | grep ^Fuzz); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

# Regenerate the BPF objects (committed, so plain builds need no clang).
generate: deps-clang
	$(GO) generate ./bpf/...

run: deps-pg build
	./$(BIN) demo

bench: deps-pg deps-bench build
	$(GO) run ./bench $(BENCHFLAGS)

bench-smoke: deps-pg deps-bench build
	$(GO) run ./bench -smoke $(BENCHFLAGS)

deps: deps-pg

deps-pg:
	@if [ -z "$(PGBIN)" ] || ! command -v psql >/dev/null || ! command -v pgbench >/dev/null; then \
	  echo "installing PostgreSQL (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib >/dev/null; \
	fi

deps-clang:
	@command -v clang >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang llvm libbpf-dev >/dev/null; }

deps-bench:
	@command -v pgbouncer >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }

clean:
	rm -rf cmd/pgmfa/bin
