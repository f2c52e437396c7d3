#!/usr/bin/env python3
# A stand-in for the original Go ops-updater (2015), for migration tests: the same
# heartbeat, layout and `control` contract, done the way the original does it (see
# shared notes: download the tarball and its .md5 into the version folder, check the md5,
# unpack with tar, stop the old version, `control start`, wait 3 s, write `.version`).
# Run as `<workdir>/ops-updater -c cfg.json`: the agents live beside the executable.
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.request

def main():
    cfg_path = "cfg.json"
    if "-v" in sys.argv:
        print("0.0.1-original")
        return
    if "-c" in sys.argv:
        cfg_path = sys.argv[sys.argv.index("-c") + 1]
    with open(cfg_path) as f:
        cfg = json.load(f)
    workdir = os.path.dirname(os.path.abspath(sys.argv[0]))
    hostname = cfg.get("hostname") or os.uname().nodename
    server = cfg["server"]
    interval = int(cfg.get("interval", 300))
    only = cfg.get("desiredAgent", "")
    time.sleep(random.random() * min(interval, 1))
    while True:
        try:
            heartbeat(workdir, hostname, server, only)
        except Exception as e:  # the original logs and carries on
            print("heartbeat failed:", e, file=sys.stderr, flush=True)
        time.sleep(interval)

def control(folder, action):
    try:
        out = subprocess.run(["./control", action], cwd=folder, capture_output=True,
                             text=True, timeout=60)
        if action != "status":
            print("control %s in %s: %s %s" % (action, folder, out.stdout.strip(),
                                               out.stderr.strip()), file=sys.stderr, flush=True)
        return out.stdout.strip()
    except Exception as e:
        return str(e)

def real_agents(workdir):
    agents = []
    for name in sorted(os.listdir(workdir)):
        vfile = os.path.join(workdir, name, ".version")
        if not os.path.isfile(vfile):
            continue
        version = open(vfile).read().strip()
        status = control(os.path.join(workdir, name, version), "status")
        agents.append({"name": name, "version": version, "status": status,
                       "timestamp": int(time.time())})
    return agents

def heartbeat(workdir, hostname, server, only):
    body = json.dumps({"hostname": hostname, "realAgents": real_agents(workdir)}).encode()
    req = urllib.request.Request("http://%s/heartbeat" % server, data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = json.load(r)
    if answer.get("errorMessage"):
        return
    for d in answer.get("desiredAgents") or []:
        if only and d["name"] != only:
            continue
        act(workdir, d)

def act(workdir, d):
    name, version = d["name"], d["version"]
    agent = os.path.join(workdir, name)
    folder = os.path.join(agent, version)
    vfile = os.path.join(agent, ".version")
    current = open(vfile).read().strip() if os.path.isfile(vfile) else ""
    if d["cmd"] == "stop":
        if current and control(os.path.join(agent, current), "status") != "stoped":
            control(os.path.join(agent, current), "stop")
        return
    if d["cmd"] != "start":
        return
    if current == version:
        if control(folder, "status") != "started":
            control(folder, "start")
        return
    os.makedirs(folder, exist_ok=True)
    file = "%s-%s.tar.gz" % (name, version)
    base = d["tarball"].rstrip("/")
    md5_base = (d.get("md5") or d["tarball"]).rstrip("/")
    tarball = os.path.join(folder, file)
    urllib.request.urlretrieve("%s/%s" % (base, file), tarball)
    md5_line = urllib.request.urlopen("%s/%s.md5" % (md5_base, file), timeout=30).read().decode()
    want = md5_line.split()[0]
    got = hashlib.md5(open(tarball, "rb").read()).hexdigest()
    if want != got:
        print("md5 mismatch", file=sys.stderr, flush=True)
        return
    subprocess.run(["tar", "xzf", file], cwd=folder, check=True)
    if current:
        control(os.path.join(agent, current), "stop")
    if control(folder, "status") != "started":
        control(folder, "start")
    time.sleep(3)
    with open(vfile, "w") as f:
        f.write(version)

if __name__ == "__main__":
    main()
