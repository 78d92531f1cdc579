"""``kvcore doctor [--json]``: what this installation can do: configuration, copy backend,
codecs, torch/CUDA, plugins. Exits 2 when the configuration is one the engine would reject."""

from __future__ import annotations

import argparse
import platform
from typing import Any

from kvcore.cli.main import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("doctor", help="check copy backend, torch/CUDA and plugin loading")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def torch_info() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - torch is optional; doctor reports why it is absent
        return {"installed": False, "error": f"{type(exc).__name__}: {exc}"}
    info: dict[str, Any] = {"installed": True, "version": torch.__version__,
                            "cuda_build": torch.version.cuda,
                            "cuda_available": bool(torch.cuda.is_available())}
    if info["cuda_available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def copy_info() -> dict[str, Any]:
    try:
        from kvcore.copy import backend_info
    except Exception as exc:  # noqa: BLE001 - doctor reports a broken copy backend, never dies
        return {"active": "unavailable", "error": f"{type(exc).__name__}: {exc}"}
    return backend_info()


def codec_info() -> dict[str, Any]:
    """Each registered codec: usable here, or why not; whether the native kernels are built."""
    from kvcore.codecs import native
    from kvcore.plugins import get_registry

    codecs: dict[str, str] = {}
    for name, factory in sorted(get_registry().codecs.items()):
        try:
            factory()
            codecs[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - doctor reports a codec that cannot load
            hint = " (pip install 'kvcore[compression]')" if isinstance(exc, ImportError) else ""
            codecs[name] = f"{type(exc).__name__}: {exc}{hint}"
    return {"codecs": codecs, "native_quantization": native.available()}


def plugin_errors() -> list[dict[str, str]]:
    from kvcore.plugins import get_registry

    return [{"name": p.name, "module": p.module, "error": p.error or ""}
            for p in get_registry().failed()]


def configuration_error() -> str | None:
    """Why the settings (``KVCORE_*``, the config file) would be rejected; None when they pass."""
    from kvcore.cli.config_cmd import effective_settings
    from kvcore.config import ConfigError

    try:
        effective_settings()
    except ConfigError as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
              "configuration_error": configuration_error(),
              "copy_backend": copy_info(), "codecs": codec_info(), "torch": torch_info(),
              "plugin_errors": plugin_errors()}
    status = 2 if report["configuration_error"] else 0
    if args.json:
        print_json(report)
        return status
    copy, torch = report["copy_backend"], report["torch"]
    print(f"python        {report['python']} on {report['platform']}")
    if report["configuration_error"]:
        print(f"config ERROR  {report['configuration_error']}")
    else:
        print("configuration valid")
    print(f"copy backend  {copy.get('active')}  (cpu: {copy.get('cpu')}, "
          f"cuda: {copy.get('cuda')}, threads: {copy.get('cpu_threads')})")
    for lib, err in copy.get("errors", {}).items():
        print(f"              {lib}: {err}")
    codecs = report["codecs"]
    built = "built" if codecs["native_quantization"] else "not built (numpy fallback)"
    print(f"codecs        native quantization {built}")
    for name, state in codecs["codecs"].items():
        print(f"              {name}: {state}")
    if torch["installed"]:
        cuda = ", ".join(torch.get("devices", [])) or "no GPU"
        print(f"torch         {torch['version']} (CUDA build: {torch['cuda_build']}; {cuda})")
    else:
        print(f"torch         not installed ({torch['error']})")
    if report["plugin_errors"]:
        for p in report["plugin_errors"]:
            print(f"plugin ERROR  {p['name']} ({p['module']}): {p['error']}")
    else:
        print("plugins       all loaded")
    return status
