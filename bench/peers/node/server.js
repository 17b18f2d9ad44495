// Echo server on the `ws` package (its defaults: no permessage-deflate on the server, no
// payload checks beyond RFC 6455's). One Node process is one thread of JavaScript;
// bench/compare.sh pins it to one CPU with taskset, as ringpush runs with shards = 1.
//   usage: node server.js [--addr HOST:PORT]     prints "listening HOST:PORT"
'use strict';

const { WebSocketServer } = require('ws');

let host = '127.0.0.1';
let port = 0;
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i += 2) {
  if (args[i] === '--addr' && args[i + 1]) {
    const at = args[i + 1].lastIndexOf(':');
    host = args[i + 1].slice(0, at);
    port = Number(args[i + 1].slice(at + 1));
  } else {
    console.error('usage: node server.js [--addr HOST:PORT]');
    process.exit(2);
  }
}

// Any path: ws answers every upgrade when no `path` option is set.
const wss = new WebSocketServer({ host, port });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => ws.terminate());
});
wss.on('listening', () => {
  const a = wss.address();
  console.log(`listening ${a.address}:${a.port}`);
});
