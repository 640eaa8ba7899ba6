# xtransit: the README's commands. Everything runs as root on Debian 12.
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest

.PHONY: setup test demo bench check lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PYTEST) -q

demo: setup
	$(PY) -m pipeline.demo

bench: setup
	$(PYTEST) bench -q --benchmark-enable --benchmark-only -p no:cacheprovider
	$(PY) -m bench.rates --generic
	$(PY) -m bench.bench_gre_rate
	$(PY) bench/bench_gre_cost.py
	$(PY) -m bench.bench_analytics

lint: setup
	.venv/bin/ruff check pipeline tests bench

clean:
	rm -rf build *.egg-info pipeline/*.so native/_*.c native/*.o .pytest_cache .venv/.xtransit-install

# --- native ESP: sanitizers and fuzzing (long runs, outside `make test`) --------------------
# sanitize: the cffi module rebuilt with -fsanitize=address,undefined into build/asan and loaded
# instead of pipeline._esp (XTRANSIT_ESP_MODULE); Python itself is not instrumented, so libasan
# and libubsan are preloaded and leak checking (CPython's own) is off. Then the ESP tests, and
# the fuzz driver under the same sanitizers, then under ThreadSanitizer.
ESP_SRC    := native/esp.c native/esp_data.c native/esp_replay.c native/esp_bench.c
SAN_FLAGS  := -O1 -g -std=gnu11 -Wall -Wextra -Wno-unused-parameter -fno-omit-frame-pointer \
              -fsanitize=address,undefined -fno-sanitize-recover=undefined
SAN_ENV     = LD_PRELOAD=$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so) \
              ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
FUZZ_INPUTS ?= 1000000

.PHONY: sanitize fuzz
sanitize: setup
	rm -rf build/asan && mkdir -p build
	XT_ESP_SANITIZE=1 $(PY) native/build_esp.py build/asan >build/asan.log 2>&1 || \
	  { tail -n 30 build/asan.log; exit 1; }
	so=$$(ls build/asan/pipeline/_esp*.so) && \
	  XTRANSIT_ESP_MODULE=$$PWD/$$so $(SAN_ENV) $(PY) -c \
	    'import pipeline.esp as e; assert "build/asan" in e._native.__file__; print("sanitize: using", e._native.__file__)' && \
	  XTRANSIT_ESP_MODULE=$$PWD/$$so $(SAN_ENV) $(PYTEST) -q -p no:cacheprovider tests/test_esp_*.py
	$(MAKE) --no-print-directory fuzz FUZZ_INPUTS=200000
	@# ThreadSanitizer over the fuzz driver (two workers and an SA-churn thread). TSan does not
	@# model atomic_thread_fence (-Wtsan says so); the fences only strengthen seq_cst accesses
	@# that TSan does model.
	gcc -O1 -g -std=gnu11 -fsanitize=thread -Wno-tsan -Inative native/esp_fuzz.c $(ESP_SRC) \
	  -lcrypto -lpthread -o build/esp_fuzz_tsan
	build/esp_fuzz_tsan 100000 1

fuzz: build/esp_fuzz
	build/esp_fuzz $(FUZZ_INPUTS) 1

build/esp_fuzz: native/esp_fuzz.c $(ESP_SRC) native/esp.h native/esp_internal.h native/esp_replay.h
	mkdir -p build
	gcc $(SAN_FLAGS) -Inative native/esp_fuzz.c $(ESP_SRC) -lcrypto -lpthread -o $@

# --- IKE core fuzzing (long run; the suite runs a 300-example smoke version) ----------------
IKE_FUZZ_EXAMPLES ?= 100000
.PHONY: fuzz-ike
fuzz-ike: setup
	IKE_FUZZ_EXAMPLES=$(IKE_FUZZ_EXAMPLES) $(PYTEST) -q -p no:cacheprovider tests/test_ike_fuzz.py

# --- IKE interop: the whole proposal matrix against strongSwan (about a minute) --------------
.PHONY: interop-ike
interop-ike: setup
	IKE_INTEROP_FULL=1 $(PYTEST) -q -p no:cacheprovider tests/test_ike_strongswan.py
