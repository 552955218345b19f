import time, pathlib
def test_serve(webui):
    pathlib.Path("/tmp/webui_url").write_text(webui.url + "\n" + str(webui.log_path) + "\n" + webui.checkpoint)
    time.sleep(3600)
