#!/usr/bin/env python3
"""Holds N idle keep-alive connections to 127.0.0.1:PORT: each sends one GET /healthz, reads the
answer, then stays silent. Waits for the port to accept first (at most 60 s). Records when all are
held, the server's VmRSS (pid), the server's CPU ticks every 50 ms for the first 3 s (to see when the
load starts), and every connection the server closes (with the time). Ends when the server process
is gone, when every connection is closed, or after --max-secs."""
import asyncio, time, argparse, json, os, signal

ap = argparse.ArgumentParser()
ap.add_argument('--port', type=int, required=True)
ap.add_argument('--pid', type=int, required=True)
ap.add_argument('-n', type=int, default=1000)
ap.add_argument('--max-secs', type=float, default=120)
ap.add_argument('--resume-pid', type=int, default=0, help='a process (the loadgen) to SIGSTOP as soon as the port accepts and to SIGCONT once all N are held')
args = ap.parse_args()
assert args.n <= 5000 and args.max_secs <= 700
HOST = '127.0.0.1'
t0 = time.time()
def rel(): return round(time.time() - t0, 3)

def status_kib(field):
    try:
        for line in open(f'/proc/{args.pid}/status'):
            if line.startswith(field):
                return int(line.split()[1])
    except FileNotFoundError:
        return None

def cpu_ticks():
    try:
        s = open(f'/proc/{args.pid}/stat').read().rsplit(')', 1)[1].split()
        return int(s[11]) + int(s[12])
    except FileNotFoundError:
        return None

closed = []
failed = []
async def one(i, ready):
    try:
        await one_(i, ready)
    except Exception as e:
        failed.append(repr(e)); ready.append(False)
async def one_(i, ready):
    r, w = await asyncio.open_connection(HOST, args.port)
    w.write(b'GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
    head = await r.readuntil(b'\r\n\r\n')
    cl = [l for l in head.decode('latin-1').split('\r\n') if l.lower().startswith('content-length:')]
    if cl:
        await r.readexactly(int(cl[0].split(':')[1]))
    ok = head.startswith(b'HTTP/1.1 200')
    ready.append(ok)
    data = await r.read(1)  # idle: returns b'' when the server closes
    closed.append((rel(), len(data)))
    w.close()

async def main():
    # wait for the port
    while time.time() - t0 < 60:
        try:
            r, w = await asyncio.open_connection(HOST, args.port); w.close(); break
        except OSError:
            await asyncio.sleep(0.005)
    else:
        print(json.dumps(dict(event='port never opened')), flush=True); return
    t_listen = rel()
    lg_socks = None
    if args.resume_pid:
        os.kill(args.resume_pid, signal.SIGSTOP)  # normally already stopped by server-wrap.sh
        import subprocess
        out = subprocess.run(['ss', '-Htnp', 'state', 'established', 'dst', f'127.0.0.1:{args.port}'],
                             capture_output=True, text=True).stdout
        lg_socks = out.count(f'pid={args.resume_pid},')  # connections the loadgen already holds to the server
        try:
            lg_state = open(f'/proc/{args.resume_pid}/stat').read().rsplit(')', 1)[1].split()[0]
        except Exception:
            lg_state = '?'
    else:
        lg_state = None
    t_stopped = rel()
    srv_ticks_at_stop = cpu_ticks()
    ready = []
    tasks = [asyncio.create_task(one(i, ready)) for i in range(args.n)]
    while len(ready) < args.n and time.time() - t0 < 60:
        await asyncio.sleep(0.002)
    t_all = rel()
    rss_held = status_kib('VmRSS:')
    if args.resume_pid:
        try: os.kill(args.resume_pid, signal.SIGCONT)
        except ProcessLookupError: pass
    print(json.dumps(dict(event='held', t_listen=t_listen, t_loadgen_stopped=t_stopped, loadgen_state=lg_state, loadgen_conns_at_stop=lg_socks, srv_ticks_at_stop=srv_ticks_at_stop, t_all_held=t_all, held=len(ready), ok=sum(ready),
                          server_rss_kib=rss_held, failed=len(failed), first_failure=failed[0] if failed else None)), flush=True)
    cpu = []
    t_end = time.time() + 3
    while time.time() < t_end:
        cpu.append((rel(), cpu_ticks())); await asyncio.sleep(0.05)
    print(json.dumps(dict(event='cpu_trace', ticks=cpu)), flush=True)
    rss = []
    while time.time() - t0 < args.max_secs and len(closed) < args.n and os.path.exists(f'/proc/{args.pid}'):
        rss.append((rel(), status_kib('VmRSS:'), args.n - len(closed)))
        await asyncio.sleep(1)
    print(json.dumps(dict(event='end', t=rel(), closed=len(closed),
                          first_close=min((c[0] for c in closed), default=None),
                          rss_samples=rss)), flush=True)
    for t in tasks: t.cancel()

try:
    asyncio.run(main())
finally:
    if args.resume_pid:
        try: os.kill(args.resume_pid, signal.SIGCONT)
        except ProcessLookupError: pass
