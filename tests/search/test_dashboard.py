"""The dashboard server stops on SIGTERM even when the signal lands in the middle of a request."""

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from tests.search.test_search import free_port

# A WSGI app that takes a second to answer, served by search.dashboard.serve_app on the given port.
SLOW_SERVER = """
import sys, time
from search.dashboard import serve_app

def app(environ, start_response):
    time.sleep(1.0)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"answered"]

serve_app(app, host="127.0.0.1", port=int(sys.argv[1]))
"""


def test_sigterm_during_a_request_answers_it_then_stops(tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180  # importing the server takes long on a loaded machine
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.1)
        answers = []
        client = threading.Thread(target=lambda: answers.append(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read()))
        client.start()
        time.sleep(0.3)  # the request is now inside the app's sleep
        server.send_signal(signal.SIGTERM)
        client.join(timeout=30)
        # before the fix the handler's KeyboardInterrupt became a 500 and the server kept serving
        assert answers == [b"answered"]
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()  # slow exits when loaded
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
