"""Agent benchmark: LangChain's ``create_agent`` with ChatKV over a task file, per category and overall.

Each task is one user message with the tools it names bound (``add``, ``subtract``, ``multiply``, ``divide``,
``get_weather``, ``get_population``, ``get_capital``; their behaviour and look-up tables are fixed by the task set's
``agent_tools.json``). The agent runs with a recursion limit (12 by default); a task succeeds when the final answer
contains one of its ``expected`` strings (case-insensitive; numbers also compared without thousands separators)
and, for a task with ``needs_tool`` false, no tool was called. The baseline row is the model answering alone, with
no tools bound.

Reported per category and overall: success rate, runs ended by the recursion limit, valid tool-call rate (calls
that parsed, named a bound tool and ran without an argument error), model calls, tool calls and generated tokens
per task, wall time per task and in total.

Every finished task is written at once to ``--out`` (JSON: the settings and one record per task and row), so a
killed run started again with the same settings resumes where it stopped.

Example (the shared task set, CPU, two threads):
    .venv/bin/python bench/agent_eval.py --model qwen2.5-coder-0.5b --threads 2 --out bench/agent_eval_qwen.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "agent_tasks.jsonl"
CATEGORIES = ("arith", "lookup", "chain", "no_tool")


# -- the tools of the task set ---------------------------------------------------------------------------------
def _number(x: float):
    return int(x) if float(x).is_integer() else x


def make_tools(tables: dict) -> dict:
    """The task set's tools as LangChain tools, keyed by name (behaviour as the data README fixes it)."""
    from langchain_core.tools import tool

    def table(name: str) -> dict:
        return {k.strip().lower(): v for k, v in tables[name].items()}

    weather, population, capital = table("weather"), table("population"), table("capital")

    @tool
    def add(a: float, b: float) -> float:
        """Add two numbers: a + b."""
        return _number(a + b)

    @tool
    def subtract(a: float, b: float) -> float:
        """Subtract b from a: a - b."""
        return _number(a - b)

    @tool
    def multiply(a: float, b: float) -> float:
        """Multiply two numbers: a * b."""
        return _number(a * b)

    @tool
    def divide(a: float, b: float) -> float | str:
        """Divide a by b: a / b."""
        if b == 0:
            return "error: division by zero"
        return _number(a / b)

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city: condition and temperature in degrees Celsius."""
        w = weather.get(city.strip().lower())
        return "error: unknown city" if w is None else f"{w['condition']}, {w['temperature_c']} C"

    @tool
    def get_population(city: str) -> int | str:
        """The number of people who live in a city."""
        p = population.get(city.strip().lower())
        return "error: unknown city" if p is None else int(p)

    @tool
    def get_capital(country: str) -> str:
        """The capital city of a country."""
        c = capital.get(country.strip().lower())
        return "error: unknown country" if c is None else c

    return {t.name: t for t in (add, subtract, multiply, divide, get_weather, get_population, get_capital)}


# -- scoring ---------------------------------------------------------------------------------------------------
_SEPARATOR = re.compile(r"(?<=\d)[,\u202f\u00a0 _'](?=\d{3}\b)")


def answer_matches(answer: str, expected: list[str]) -> bool:
    """Whether ``answer`` contains one of ``expected`` (case-insensitive; thousands separators ignored)."""
    text = answer.lower()
    plain = _SEPARATOR.sub("", text)
    return any(e.lower() in text or e.lower() in plain for e in expected)


def _content(m) -> str:
    c = m.content
    return c if isinstance(c, str) else "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in c)


def summarize_messages(messages: list) -> dict:
    """Counts over an agent run's messages: model calls, tool calls, valid calls, generated tokens, the answer."""
    from langchain_core.messages import AIMessage, ToolMessage

    ais = [m for m in messages if isinstance(m, AIMessage)]
    tools = [m for m in messages if isinstance(m, ToolMessage)]
    calls = sum(len(m.tool_calls) for m in ais)
    invalid = sum(len(m.invalid_tool_calls) for m in ais)
    errors = sum(1 for t in tools if getattr(t, "status", "success") == "error")
    tokens = sum((m.usage_metadata or {}).get("output_tokens", 0) for m in ais)
    final = next((m for m in reversed(ais) if not m.tool_calls), None)
    return {
        "model_calls": len(ais), "tool_calls": calls, "invalid_tool_calls": invalid, "tool_errors": errors,
        "valid_tool_calls": max(0, calls - errors), "generated_tokens": tokens,
        "answer": _content(final) if final is not None else "",
        "trace": [
            {"role": type(m).__name__, "content": _content(m)[:300],
             **({"tool_calls": [{"name": c["name"], "args": c["args"]} for c in m.tool_calls]}
                if isinstance(m, AIMessage) and m.tool_calls else {})}
            for m in messages
        ],
    }


# -- running ---------------------------------------------------------------------------------------------------
def run_agent_task(llm, task: dict, tools: dict, recursion_limit: int) -> dict:
    from langchain.agents import create_agent
    from langgraph.errors import GraphRecursionError

    agent = create_agent(model=llm, tools=[tools[n] for n in task["tools"]])
    state = {"messages": []}
    ended = "answer"
    error = None
    t0 = time.perf_counter()
    try:
        inputs = {"messages": [{"role": "user", "content": task["prompt"]}]}
        for state in agent.stream(inputs, {"recursion_limit": recursion_limit}, stream_mode="values"):  # noqa: B007
            pass  # the last state is kept: it holds the messages even when the recursion limit ends the run
    except GraphRecursionError:
        ended = "recursion_limit"
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        ended, error = "error", f"{type(e).__name__}: {e}"[:500]
    wall = time.perf_counter() - t0
    rec = summarize_messages(state.get("messages", []))
    ok = ended == "answer" and answer_matches(rec["answer"], task["expected"])
    if not task.get("needs_tool", True):
        ok = ok and rec["tool_calls"] == 0
    return {**rec, "ended": ended, "error": error, "success": ok, "wall_s": round(wall, 3)}


def run_baseline_task(llm, task: dict) -> dict:
    from langchain_core.messages import HumanMessage

    t0 = time.perf_counter()
    error = None
    try:
        msg = llm.invoke([HumanMessage(task["prompt"])])
        messages = [HumanMessage(task["prompt"]), msg]
    except Exception as e:  # noqa: BLE001
        messages, error = [HumanMessage(task["prompt"])], f"{type(e).__name__}: {e}"[:500]
    wall = time.perf_counter() - t0
    rec = summarize_messages(messages)
    ok = error is None and answer_matches(rec["answer"], task["expected"])
    return {**rec, "ended": "answer" if error is None else "error", "error": error, "success": ok,
            "wall_s": round(wall, 3)}


# -- the results file --------------------------------------------------------------------------------------------
def load_results(path: Path, settings: dict, fresh: bool) -> dict:
    if path.exists() and not fresh:
        data = json.loads(path.read_text())
        if data.get("settings") != settings:
            diff = {k: (data.get("settings", {}).get(k), v) for k, v in settings.items()
                    if data.get("settings", {}).get(k) != v}
            raise SystemExit(f"{path} holds a run with other settings {diff}; pass --fresh to start over or "
                             "another --out")
        return data
    return {"settings": settings, "runs": [], "records": {}}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


# -- the table ---------------------------------------------------------------------------------------------------
def aggregate(records: list[dict]) -> dict:
    n = len(records)
    if n == 0:
        return {}
    calls = sum(r["tool_calls"] for r in records)
    return {
        "tasks": n,
        "success": sum(r["success"] for r in records) / n,
        "recursion_limit": sum(r["ended"] == "recursion_limit" for r in records),
        "errors": sum(r["ended"] == "error" for r in records),
        "valid_call_rate": (sum(r["valid_tool_calls"] for r in records) /
                            max(1, calls + sum(r["invalid_tool_calls"] for r in records))) if calls else None,
        "model_calls": sum(r["model_calls"] for r in records) / n,
        "tool_calls": calls / n,
        "tokens": sum(r["generated_tokens"] for r in records) / n,
        "wall_s": sum(r["wall_s"] for r in records) / n,
        "total_s": sum(r["wall_s"] for r in records),
    }


def table(data: dict, tasks: list[dict]) -> str:
    order = [c for c in CATEGORIES if any(t["category"] == c for t in tasks)]
    order += sorted({t["category"] for t in tasks} - set(order))
    lines = ["| row | category | tasks | success | recursion-limit endings | valid tool calls | model calls / task | "
             "tool calls / task | generated tokens / task | s / task | total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ("agent", "no_tools"):
        recs = {t["id"]: data["records"].get(f"{row}:{t['id']}") for t in tasks}
        if not any(recs.values()):
            continue
        for cat in [*order, "overall"]:
            sel = [r for t in tasks if (cat == "overall" or t["category"] == cat) and (r := recs[t["id"]])]
            a = aggregate(sel)
            if not a:
                continue
            valid = "-" if a["valid_call_rate"] is None else f"{100 * a['valid_call_rate']:.0f} %"
            lines.append(
                f"| {row} | {cat} | {a['tasks']} | {100 * a['success']:.0f} % | {a['recursion_limit']} | {valid} | "
                f"{a['model_calls']:.2f} | {a['tool_calls']:.2f} | {a['tokens']:.1f} | {a['wall_s']:.1f} | "
                f"{a['total_s']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run LangChain's create_agent with ChatKV over an agent task file and report success, "
                    "recursion-limit endings, tool calls, tokens and time per category, with a no-tools baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="task file (JSON Lines: id, category, prompt, "
                    "tools, expected, needs_tool)")
    ap.add_argument("--tools-data", type=Path, default=None,
                    help="look-up tables of the tools (default: agent_tools.json beside --data)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="ChatKV model (registry name, hub id or path)")
    ap.add_argument("--dtype", default="auto", help="ChatKV dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--device", default="auto", help="ChatKV device")
    ap.add_argument("--threads", default=None,
                    help="CPU threads for torch (an integer; default: kvagents measures at model load)")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: ChatKV's)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (reproducible runs)")
    ap.add_argument("--max-tokens", type=int, default=None, help="max tokens per model call (default: ChatKV's)")
    ap.add_argument("--recursion-limit", type=int, default=12, help="langgraph recursion limit of each agent run")
    ap.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    ap.add_argument("--ids", default=None, help="only these task ids (comma-separated)")
    ap.add_argument("--categories", default=None, help="only these categories (comma-separated)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-tools baseline row")
    ap.add_argument("--baseline-only", action="store_true", help="run only the no-tools baseline row")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON of settings and per-task records, written after every task (resumed when present); "
                         "default: <kvagents cache>/bench/agent_eval-<model>.json")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing --out and start over")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    ap.add_argument("--quiet", action="store_true", help="no per-task lines")
    args = ap.parse_args(argv)

    if args.threads is not None:
        os.environ["KVAGENTS_THREADS"] = str(args.threads)
    tools_path = args.tools_data or args.data.with_name("agent_tools.json")
    raw = args.data.read_bytes()
    tasks = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    if args.ids:
        keep = set(args.ids.split(","))
        tasks = [t for t in tasks if t["id"] in keep]
    if args.categories:
        keep = set(args.categories.split(","))
        tasks = [t for t in tasks if t["category"] in keep]
    if args.limit is not None:
        tasks = tasks[: args.limit]
    if not tasks:
        raise SystemExit("no tasks selected")

    import torch
    from langchain_kvagents import ChatKV

    if args.threads is not None:
        torch.set_num_threads(int(args.threads))
    kw = {"model": args.model, "dtype": args.dtype, "device": args.device, "seed": args.seed}
    if args.temperature is not None:
        kw["temperature"] = args.temperature
    if args.max_tokens is not None:
        kw["max_tokens"] = args.max_tokens
    llm = ChatKV(**kw)
    settings = {
        "data_sha256": hashlib.sha256(raw).hexdigest()[:16], "tools_sha256":
            hashlib.sha256(tools_path.read_bytes()).hexdigest()[:16], "model": args.model, "dtype": args.dtype,
        "device": args.device, "temperature": llm.temperature, "seed": args.seed, "max_tokens": llm.max_tokens,
        "recursion_limit": args.recursion_limit,
        "chatkv": {k: getattr(llm, k) for k in ("auto_tool_calls", "repeated_tool_calls", "answer_cue",
                                                 "parallel_tool_calls", "thinking", "ungrounded_tool_calls",
                                                 "retry_other_tools", "max_tool_rounds", "after_tool_temperature")},
    }
    if args.out is None:
        from kvagents.registry import cache_dir

        args.out = cache_dir() / "bench" / f"agent_eval-{Path(args.model).name}.json"
    data = load_results(args.out, settings, args.fresh)
    tools = make_tools(json.loads(tools_path.read_text()))
    try:
        load1 = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Unix
        load1 = None
    data["runs"].append({
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_avg_1m_at_start": load1, "python": sys.version.split()[0], "torch": torch.__version__,
    })
    rows = [] if args.baseline_only else ["agent"]
    if not args.no_baseline:
        rows.append("no_tools")
    t_start = time.perf_counter()
    for row in rows:
        for k, task in enumerate(tasks):
            key = f"{row}:{task['id']}"
            if key in data["records"]:
                continue
            rec = (run_agent_task(llm, task, tools, args.recursion_limit) if row == "agent"
                   else run_baseline_task(llm, task))
            rec.update({"id": task["id"], "category": task["category"], "row": row})
            data["records"][key] = rec
            data["runs"][-1]["torch_threads"] = torch.get_num_threads()
            save_results(args.out, data)
            if not args.quiet:
                mark = "ok " if rec["success"] else "-- "
                print(f"[{row} {k + 1}/{len(tasks)}] {mark}{task['id']} {rec['ended']} calls={rec['tool_calls']} "
                      f"tokens={rec['generated_tokens']} {rec['wall_s']:.1f}s  {rec['answer'][:70]!r}", flush=True)
    data["runs"][-1]["wall_s"] = round(time.perf_counter() - t_start, 1)
    save_results(args.out, data)
    out = table(data, tasks)
    run = data["runs"][-1]
    head = (f"model {args.model}, dtype {llm.llm.dtype if llm.llm.loaded else args.dtype}, "
            f"torch threads {run.get('torch_threads', torch.get_num_threads())}, {run['cpus']} CPUs, "
            f"load {run['load_avg_1m_at_start']}, {run['started']}, {len(tasks)} tasks of {args.data.name}")
    print(head)
    print(out)
    if args.markdown:
        args.markdown.write_text(head + "\n\n" + out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
