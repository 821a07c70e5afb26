#!/usr/bin/env python3
"""Hostile-label client: N requests, each with a distinct method (M<n> padded to ~100 bytes) and a
distinct path (/nowhere/<n> by default), over a few keep-alive connections on 127.0.0.1.
At checkpoints it pauses, reads the server's VmRSS and the size of GET /metrics. Bounded: stops
after N requests or a wall-clock limit."""
import asyncio, sys, time, argparse, urllib.request, json

ap = argparse.ArgumentParser()
ap.add_argument('--port', type=int, required=True)
ap.add_argument('--pid', type=int, required=True)
ap.add_argument('--total', type=int, default=100000)
ap.add_argument('--conns', type=int, default=16)
ap.add_argument('--checkpoints', default='10000,50000,100000')
ap.add_argument('--path', default='/nowhere/{n}', help='path template; {n} is the request number')
ap.add_argument('--time-limit', type=float, default=900)
ap.add_argument('--label', default='')
args = ap.parse_args()
assert args.total <= 200000
HOST = '127.0.0.1'
deadline = time.monotonic() + args.time_limit
statuses = {}
reconnects = 0

def rss_kib():
    for line in open(f'/proc/{args.pid}/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])

def metrics_size():
    with urllib.request.urlopen(f'http://{HOST}:{args.port}/metrics', timeout=120) as r:
        body = r.read()
    series = sum(1 for l in body.split(b'\n') if l and not l.startswith(b'#'))
    return len(body), series

async def read_response(reader):
    head = await reader.readuntil(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split()[1])
    headers = {}
    for l in lines[1:]:
        if ':' in l:
            k, v = l.split(':', 1)
            headers[k.strip().lower()] = v.strip()
    close = headers.get('connection', '').lower() == 'close'
    if 'content-length' in headers:
        await reader.readexactly(int(headers['content-length']))
    elif headers.get('transfer-encoding', '').lower() == 'chunked':
        while True:
            size = int((await reader.readuntil(b'\r\n')).strip().split(b';')[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        close = True
    return status, close

class Conn:
    def __init__(self):
        self.r = self.w = None
    async def ensure(self):
        global reconnects
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(HOST, args.port)
            reconnects += 1
    async def send(self, n):
        method = f'M{n:099d}'
        path = args.path.format(n=n)
        req = f'{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n'.encode()
        for attempt in range(3):
            try:
                await self.ensure()
                self.w.write(req)
                status, close = await read_response(self.r)
                statuses[status] = statuses.get(status, 0) + 1
                if close:
                    self.w.close(); self.w = None
                return
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                if self.w: self.w.close()
                self.w = None
        statuses['error'] = statuses.get('error', 0) + 1

async def phase(conns, lo, hi):
    nxt = [lo]
    async def worker(c):
        while time.monotonic() < deadline:
            n = nxt[0]
            if n >= hi:
                return
            nxt[0] += 1
            await c.send(n)
    await asyncio.gather(*(worker(c) for c in conns))

def point(sent, t0):
    rss_before = rss_kib()
    size, series = metrics_size()
    rec = dict(label=args.label, sent=sent, rss_kib=rss_before, rss_after_metrics_kib=rss_kib(), metrics_bytes=size, metrics_series=series,
               secs=round(time.monotonic() - t0, 1), statuses=dict(statuses), connections_opened=reconnects)
    print(json.dumps(rec), flush=True)

async def main():
    conns = [Conn() for _ in range(args.conns)]
    t0 = time.monotonic()
    point(0, t0)
    done = 0
    for cp in [int(x) for x in args.checkpoints.split(',')]:
        cp = min(cp, args.total)
        await phase(conns, done, cp)
        done = cp
        point(done, t0)
        if time.monotonic() >= deadline:
            print('time limit reached', flush=True); break
    for c in conns:
        if c.w: c.w.close()

asyncio.run(main())
