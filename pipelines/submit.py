"""Submit the compiled pipeline to a Kubeflow Pipelines API: what `make submit` runs.

    python -m pipelines.submit --endpoint https://kfp.example.com build/cdsp_pipeline.yaml \\
        data_uri=s3://my-data/voc gpus=2 epochs=30

Run arguments are `name=value`, typed by the pipeline's own parameter types: `gpus=2` goes
out as the string "2" (KFP's driver makes a GPU limit only of a string) and `epochs=30` as a
number. (kfp's CLI guesses a type from the text instead, so there a string parameter that
looks like a number needs JSON quotes: `gpus='"2"'`.) The endpoint is tried once, with a short
timeout, before the kfp client (which retries and logs tracebacks) is started: an unreachable
or refusing endpoint is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.error
import urllib.request
import warnings

import yaml

from cdsp_core import config
from cdsp_core.credentials import redact
from cdsp_core.errors import CdspError

HEALTHZ = "/apis/v2beta1/healthz"
TIMEOUT_S = 10.0


def parameter_types(package: str) -> dict[str, str]:
    """{name: KFP parameter type} of the compiled pipeline's run parameters."""
    try:
        with open(package, encoding="utf-8") as fh:
            spec = next(yaml.safe_load_all(fh))
        return {k: v["parameterType"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration) as e:
        raise CdspError(f"{package}: not a compiled KFP pipeline ({e}); run `make pipeline`") from None


def typed_arguments(types: dict[str, str], pairs: list[str]) -> dict:
    """`name=value` run arguments as the values of their parameters' types."""
    out = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise CdspError(f"{pair!r}: give run arguments as name=value")
        if name not in types:
            raise CdspError(f"{name}: not a parameter of this pipeline (parameters: {', '.join(sorted(types))})")
        kind = types[name]
        try:
            if kind == "STRING":
                out[name] = text
            elif kind == "NUMBER_INTEGER":
                out[name] = int(text)
            elif kind == "NUMBER_DOUBLE":
                out[name] = float(text)
            elif kind == "BOOLEAN":
                out[name] = {"true": True, "false": False}[text.lower()]
            else:
                out[name] = json.loads(text)
        except (ValueError, KeyError):
            raise CdspError(f"{name}={text!r}: not a value of type {kind}") from None
    return out


def check_endpoint(endpoint: str, timeout: float = TIMEOUT_S) -> None:
    """One request to the API's health endpoint; a CdspError saying why it cannot be used."""
    if not endpoint.startswith(("http://", "https://")):
        raise CdspError(f"KFP endpoint {endpoint!r}: give its URL, with http:// or https://")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # as the kfp client: no proxy variables
    try:
        with direct.open(endpoint.rstrip("/") + HEALTHZ, timeout=timeout):
            pass
    except urllib.error.HTTPError as e:
        raise CdspError(f"the KFP API at {endpoint} answered HTTP {e.code} ({e.reason}) to {HEALTHZ}: "
                        "is this the KFP API address, and does it need a login?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CdspError(f"cannot reach the KFP API at {endpoint} ({reason}); check the endpoint, e.g. "
                        "`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80` and "
                        "KFP_ENDPOINT=http://localhost:8080") from None


def submit(endpoint: str, package: str, experiment: str, arguments: dict) -> str:
    """Create the run; its id."""
    import kfp
    import urllib3

    with warnings.catch_warnings():  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
        warnings.simplefilter("ignore", FutureWarning)
        client = kfp.Client(host=endpoint)
    try:
        result = client.create_run_from_pipeline_package(package, arguments=arguments, experiment_name=experiment)
    except kfp.client.client.kfp_server_api.ApiException as e:
        try:
            detail = json.loads(e.body).get("message") or e.body
        except (TypeError, ValueError, AttributeError):
            detail = e.body or e.reason
        raise CdspError(f"the KFP API at {endpoint} refused the run: HTTP {e.status}: {detail}") from None
    except urllib3.exceptions.HTTPError as e:
        raise CdspError(f"the KFP API at {endpoint} went away: {e}") from None
    return result.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="KFP API address, e.g. https://kfp.example.com")
    parser.add_argument("--experiment", default="cdsp", help="KFP experiment of the run (default: cdsp)")
    parser.add_argument("package", help="compiled pipeline YAML (make pipeline)")
    parser.add_argument("arguments", nargs="*", help="run arguments, name=value")
    args = parser.parse_args(argv)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings; our error says it once
    try:
        arguments = typed_arguments(parameter_types(args.package), args.arguments)
        config.check_values(arguments, named=lambda name: name)  # the ranges a step would refuse, before the run
        check_endpoint(args.endpoint)
        run_id = submit(args.endpoint, args.package, args.experiment, arguments)
    except CdspError as e:
        print(f"submit: error: {redact(str(e))}", file=sys.stderr)
        return 2
    print(f"submitted run {run_id} (experiment {args.experiment}) with {json.dumps(arguments, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
