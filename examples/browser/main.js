// A browser dials a go-libp2p host over Secure WebSockets and pings it,
// and fetch()es a URL the host serves over HTTPS on the same port.
//
// URL parameters:
//   ma=<multiaddr>   dial this address as soon as the page loads
//   http=<url>       fetch this https:// URL as soon as the page loads
//   report=<url>     POST the outcome there as JSON when done:
//                    {ok, remotePeer, rtts, error, fetch}, fetch being
//                    {ok, status, protocol, body, error} when http is given
//   timeout=<ms>     budget for the dial and all pings, and for the fetch
//                    (default 20000)
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { webSockets } from '@libp2p/websockets'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'

const PINGS = 5
const params = new URLSearchParams(window.location.search)
const timeoutMs = Number(params.get('timeout')) || 20_000
const $ = (id) => document.getElementById(id)

let node // created by the first dial

async function newNode () {
  const node = await createLibp2p({
    transports: [webSockets()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      // ping() resolves before its stream is fully closed, so back-to-back
      // pings can trip the default limit of one outbound ping stream.
      ping: ping({ maxOutboundStreams: PINGS })
    },
    // In browsers js-libp2p's default gater refuses to dial loopback and
    // private addresses. This demo is meant for those too (a host on
    // 127.0.0.1 or the LAN), so it allows every address it is given.
    connectionGater: { denyDialMultiaddr: async () => false }
  })
  node.addEventListener('peer:identify', (evt) => {
    $('agent').textContent = evt.detail.agentVersion ?? '(none)'
  })
  return node
}

function show (status, cls = '') {
  $('status').textContent = status
  $('status').className = cls
}

// run dials addr, pings the remote PINGS times and returns the outcome in
// the shape reported to ?report=. It never throws.
async function run (addr) {
  const result = { ok: false, remotePeer: '', rtts: [], error: '' }
  const signal = AbortSignal.timeout(timeoutMs)
  $('peer').textContent = $('agent').textContent = $('rtts').textContent = '–'
  try {
    const ma = multiaddr(addr.trim())
    node ??= await newNode()
    show(`dialing ${ma}`)
    const conn = await node.dial(ma, { signal })
    result.remotePeer = conn.remotePeer.toString()
    $('peer').textContent = result.remotePeer
    show('connected, pinging')
    for (let i = 0; i < PINGS; i++) {
      result.rtts.push(await node.services.ping.ping(conn.remotePeer, { signal }))
      $('rtts').textContent = result.rtts.map((ms) => `${ms} ms`).join(', ')
    }
    result.ok = true
    show(`connected via ${conn.remoteAddr}`, 'ok')
  } catch (err) {
    result.error = (signal.aborted ? `timed out after ${timeoutMs} ms: ` : '') + describe(err)
    show(`failed: ${result.error}`, 'error')
  }
  console.log('autotls-demo result', JSON.stringify(result))
  return result
}

function describe (err) {
  if (err instanceof Event) {
    // What a failed WebSocket throws: the browser keeps the reason to itself
    // (and its console), the usual ones being an untrusted certificate, a
    // name the certificate does not cover and a refused connection.
    return `WebSocket ${err.type}: connection failed (the browser's console says why)`
  }
  if (err instanceof AggregateError) {
    return `${err.message}: ${err.errors.map(describe).join('; ')}`
  }
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err)
}

// fetchURL GETs url (cross-origin: the host must send CORS headers) and
// returns the outcome in the shape reported to ?report=. It never throws.
async function fetchURL (url) {
  const result = { ok: false, status: 0, protocol: '', body: '', error: '' }
  const signal = AbortSignal.timeout(timeoutMs)
  $('http-status').textContent = `fetching ${url}`
  $('http-body').textContent = '–'
  try {
    const resp = await fetch(url, { signal, cache: 'no-store' })
    result.status = resp.status
    result.body = await resp.text()
    result.ok = resp.ok
    // The protocol the browser used (h2, http/1.1); the host must send
    // Timing-Allow-Origin for a cross-origin entry to carry it.
    const entry = performance.getEntriesByName(resp.url).pop()
    result.protocol = entry?.nextHopProtocol ?? ''
    $('http-status').textContent = `${resp.status} ${resp.statusText} over ${result.protocol || '(unknown protocol)'}`
    $('http-status').className = resp.ok ? 'ok' : 'error'
    $('http-body').textContent = pretty(result.body)
  } catch (err) {
    // A failed fetch is a bare TypeError; the console says why.
    result.error = (signal.aborted ? `timed out after ${timeoutMs} ms: ` : '') + describe(err)
    $('http-status').textContent = `failed: ${result.error}`
    $('http-status').className = 'error'
  }
  console.log('autotls-demo fetch', JSON.stringify(result))
  return result
}

function pretty (text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2)
  } catch {
    return text
  }
}

async function report (url, result) {
  try {
    await fetch(url, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(result)
    })
  } catch (err) {
    console.error('reporting the result failed', err)
  }
}

async function dial (addr) {
  $('dial').disabled = true
  const result = await run(addr)
  $('dial').disabled = false
  return result
}

$('dial-form').addEventListener('submit', (evt) => {
  evt.preventDefault()
  dial($('ma').value)
})

$('http-form').addEventListener('submit', (evt) => {
  evt.preventDefault()
  fetchURL($('http').value.trim())
})

const ma = params.get('ma')
const httpURL = params.get('http')
if (httpURL != null) $('http').value = httpURL
if (ma != null || httpURL != null) {
  if (ma != null) $('ma').value = ma
  const [result, fetched] = await Promise.all([
    ma != null ? dial(ma) : { ok: false, remotePeer: '', rtts: [], error: 'no multiaddr to dial' },
    httpURL != null ? fetchURL(httpURL) : undefined
  ])
  if (fetched !== undefined) result.fetch = fetched
  const url = params.get('report')
  if (url != null) await report(url, result)
}
