"""An SGLang HTTP server for checks and benchmarks, and the files it needs offline.

``write_byte_tokenizer`` trains a small byte-level BPE tokenizer on generated text (no
download), ``write_sharegpt_json`` writes prompts in the ShareGPT format that
``sglang.bench_serving --dataset-name random`` samples from, ``Server`` runs
``python -m sglang.launch_server`` in its own process group on 127.0.0.1 and
``bench_serving`` runs ``python -m sglang.bench_serving`` against it. ``stream_generate``
reads a streaming ``/generate`` and can hang up early (a client disconnect).

Only ``device_server_args`` imports this plugin's SGLang code, so the rest also serves
benchmarks of another SGLang release (the upstream peer).
"""

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import List, Optional, Tuple

WORDS = (
    "the of and to in is was for on are with as by at from this that have not but all "
    "can more one time two new first about after year number water people field table "
    "system model token cache layer head rank group decode prefill batch memory"
).split()


def random_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(["", "s", "ed", "ing", "er"]) for _ in range(num_words))


def write_byte_tokenizer(model_dir: str, vocab_size: int, model_vocab_size: int = 0) -> None:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens into ``model_dir``.

    With ``model_vocab_size``, ids from the trained vocabulary up to it are added as
    placeholder tokens (``<t123>``), so that every token a model with that vocabulary can
    sample decodes to text: ``bench_serving`` sees the first token only when it has text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = random.Random(0)
    tokenizer.train_from_iterator((random_text(rng, 64) for _ in range(2000)), trainer)
    tokenizer.add_tokens([f"<t{i}>" for i in range(tokenizer.get_vocab_size(), model_vocab_size)])
    tokenizer.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}, f)


def write_sharegpt_json(path: str, num_conversations: int, words_per_turn: int = 400) -> str:
    rng = random.Random(1)
    conversations = [
        {"conversations": [{"value": random_text(rng, words_per_turn)}, {"value": random_text(rng, 64)}]}
        for _ in range(num_conversations)
    ]
    with open(path, "w") as f:
        json.dump(conversations, f)
    return path


def bind_cpu_threads(tp_size: int) -> None:
    """One OpenMP core per rank, round robin, for SGLang on CPU (read by the schedulers)."""
    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(
        str(rank % os.cpu_count()) for rank in range(tp_size)
    )


def device_server_args(device: str, tp_size: int) -> List[str]:
    """``--device`` and the attention backend DCP runs there (binding CPU threads on CPU); in
    the shared-GPU test mode (all ranks on one GPU) a small share of the device and eager."""
    from sglang_dcp.server_args import DCP_ATTENTION_BACKENDS
    from sglang_dcp.test.shared_gpu import shared_gpu_enabled

    args = ["--device", device, "--attention-backend", DCP_ATTENTION_BACKENDS[device]]
    if device == "cpu":
        bind_cpu_threads(tp_size)
    elif shared_gpu_enabled():
        args += ["--disable-cuda-graph", "--mem-fraction-static", "0.1", "--max-total-tokens", "65536"]
    return args


def http_json(url: str, body: Optional[dict] = None, timeout: float = 600):
    """GET (no body) or POST JSON; returns ``(status, parsed JSON or text)``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def stream_generate(url: str, body: dict, hang_up_after_chunks: Optional[int] = None,
                    hang_up_after_s: Optional[float] = None, timeout: float = 600) -> Tuple[int, List[dict]]:
    """POST ``body`` with ``"stream": true`` to ``url`` + ``/generate`` and read its events.

    Hangs up (closes the connection: SGLang aborts the request) after ``hang_up_after_chunks``
    events or once ``hang_up_after_s`` seconds have passed, whichever comes first. Returns the
    HTTP status (0 if it hung up before the response began) and the events read
    (``/generate`` sends cumulative ``output_ids``; the last event of a finished request has
    ``meta_info["finish_reason"]``), or the error body as ``[{"error": text}]`` for a status
    other than 200.
    """
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    status, events = 0, []
    try:
        connection.request("POST", "/generate", json.dumps({**body, "stream": True}),
                           {"Content-Type": "application/json"})
        deadline = None if hang_up_after_s is None else time.time() + hang_up_after_s
        if deadline is not None:
            connection.sock.settimeout(max(hang_up_after_s, 1e-3))
        try:
            response = connection.getresponse()
            status = response.status
            if status != 200:
                return status, [{"error": response.read().decode()}]
            while hang_up_after_chunks is None or len(events) < hang_up_after_chunks:
                if deadline is not None:
                    connection.sock.settimeout(max(deadline - time.time(), 1e-3))
                line = response.readline()
                if not line or line.strip() == b"data: [DONE]":
                    break
                if line.startswith(b"data: "):
                    events.append(json.loads(line[len(b"data: "):]))
        except TimeoutError:  # hang_up_after_s passed
            pass
        return status, events
    finally:
        connection.close()


class Server:
    """``python -m sglang.launch_server`` on 127.0.0.1, as a context manager.

    With ``progress_s > 0``, start-up prints a line every ``progress_s`` seconds: the time
    since launch and the last line of the server log.
    """

    def __init__(self, args: List[str], port: int, log_path: str, wait_s: float = 900,
                 progress_s: float = 0):
        self.args, self.port, self.log_path, self.wait_s = args, port, log_path, wait_s
        self.progress_s = progress_s
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> "Server":
        cmd = [sys.executable, "-m", "sglang.launch_server", *self.args,
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        start = time.time()
        next_report = start + self.progress_s
        while time.time() < start + self.wait_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} "
                                   f"({self.last_log_line()}); see {self.log_path}")
            try:
                if http_json(self.url + "/health_generate", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            if self.progress_s and time.time() >= next_report:
                print(f"  {time.time() - start:4.0f} s  {self.last_log_line()[:110]}", flush=True)
                next_report += self.progress_s
            time.sleep(2)
        self.__exit__()
        raise TimeoutError(f"server not ready after {self.wait_s} s; see {self.log_path}")

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def server_info(self) -> dict:
        return http_json(self.url + "/get_server_info")[1]

    def wait_idle(self, timeout: float = 120) -> float:
        """Poll ``/get_load`` until no request runs or waits (a chunked prefill under way is
        neither); returns the seconds it took."""
        start = time.time()
        while sum(load["num_reqs"] for load in http_json(self.url + "/get_load")[1]) > 0:
            if time.time() - start > timeout:
                raise TimeoutError(f"requests still running after {timeout} s; see {self.log_path}")
            time.sleep(0.2)
        return time.time() - start

    def last_log_line(self) -> str:
        """The last complete non-empty line among the log's final 64 KiB ("(no log yet)" if none)."""
        size = os.path.getsize(self.log_path)
        with open(self.log_path, "rb") as f:
            f.seek(max(0, size - 65536))
            lines = f.read().decode(errors="replace").splitlines()[1 if size > 65536 else 0:]
        return next((line.strip() for line in reversed(lines) if line.strip()), "(no log yet)")


def bench_serving(server: Server, tokenizer: str, args: List[str], log_path: str) -> Tuple[int, Optional[dict]]:
    """``python -m sglang.bench_serving --backend sglang`` against ``server`` with ``args``
    (dataset, lengths, prompts...), output appended to ``log_path``. Returns its exit code
    and, if it succeeded, its JSON summary (the line it appends to ``--output-file``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "bench.jsonl")
        run = subprocess.run(
            [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", server.url,
             "--tokenizer", tokenizer, "--output-file", out_file, *args],
            capture_output=True, text=True,
        )
        with open(log_path, "a") as log:
            log.write(run.stdout + run.stderr)
        if run.returncode != 0 or not os.path.exists(out_file):
            return run.returncode, None
        with open(out_file) as f:
            return run.returncode, json.loads(f.read().splitlines()[-1])
