"""A local web page to search a finished run: drop or pick a photo, draw the query box
with the mouse (or keep the whole image) and see the ranked database images with the
object's box found by re-ranking, their scores and the time the query took; a second
view browses the dataset's own queries with their ground truth (positive / negative /
junk frames, as in step E's report).

Searches run exactly as step D ranks a query (lib/service/query_service.py). The models
and the memory-mapped index are loaded once; werkzeug's threaded server answers several
requests at a time. It listens on localhost only unless --host says otherwise; uploads
are capped (--max-upload-mb) and so are decoded pixels (--max-pixels). The page uses no
network: its HTML, CSS and JavaScript are served from lib/service/static. See
docs/search.md.
"""

from __future__ import annotations

from lib.cli import load_from_args, make_parser, run_main, setup_logging


def main() -> None:
    p = make_parser("serve.py", __doc__ or "")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000; 0 = any free port)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="upload cap (20 MB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest photo decoded, in pixels (40 M; at most max_image_pixels)")
    p.add_argument("--max-concurrent", type=int, default=4,
                   help="searches running at once; more requests wait (4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and FAISS threads per search (1: concurrent requests use "
                        "the cores; more oversubscribe a busy machine)")
    args = p.parse_args()
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        # imported here, not at the top: --help and bad arguments need no torch
        import faiss
        import torch
        from werkzeug.serving import make_server

        from lib.service.query_service import QueryService
        from lib.service.web import create_app

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        settings = load_from_args(args, resolve_auto=True)
        pixels = min(args.max_pixels, int(settings["max_image_pixels"]))
        with QueryService(settings, max_pixels=pixels,
                          max_concurrent=args.max_concurrent) as svc:
            app = create_app(svc, max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
            server = make_server(args.host, args.port, app, threaded=True)
            print(f"serve: {settings['dataset']} ({svc.n_db} images) on "
                  f"http://{args.host}:{server.server_port}/ (Ctrl-C stops)", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                print("serve: stopped")
            finally:
                server.server_close()
        return 0

    run_main(body, "serve")


if __name__ == "__main__":
    main()
