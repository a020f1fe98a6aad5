// juzi's own open-source puppet server (npm @juzi/wechaty-puppet-service: PuppetServer, its auth, event stream
// manager, upload registry, error mapping) around a small WorkPro-like puppet, for tests/test_workpro_juzi.py.
//
//   node server.mjs PORT TOKEN [tls]      (run from a folder where the npm packages are installed)
//
// The puppet: Start shows a WeCom QR (SCAN 2), the phone "scans" it 300 ms later (SCAN 3, then VERIFY_CODE whose
// id is the QR's key); EnterVerifyCode takes 123456 (a wrong code: 'Invalid verify code!'; the third:
// '验证码错误次数超过阈值，请重新扫码' and a new QR); LOGIN, READY; Logout, then a new QR. Contacts c0000… with the
// account itself listed too; sends of every kind, each printed as one JSON line on stdout ({"ev": "send", ...});
// our own texts come back as MESSAGE events, and the text ECHO makes the customer answer.
import * as PUPPET from '@juzi/wechaty-puppet'
import { PuppetServer } from '@juzi/wechaty-puppet-service'

const [port, token, tlsArg] = process.argv.slice(2)
const KEYS = ['A1B2C3D4E5F60718293A4B5C6D7E8F90', 'FFEEDDCCBBAA99887766554433221100']
const SELF = '1688000000000001'
const N = Number(process.env.N_CONTACTS || 25)
const CODE = '123456'
const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

class WorkproLike extends PUPPET.Puppet {
  constructor () {
    super()
    this.count = 0
    this.tags = { t1: ['c0001'] }
    this.msgs = {}
    this.wrong = 0
    this.key = KEYS[0]
  }

  async onStart () { setTimeout(() => this.showQr(KEYS[0]), 200) }
  async onStop () {}

  showQr (key) {
    this.key = key
    this.wrong = 0
    this.emit('scan', { qrcode: `https://wx.work.weixin.qq.com/cgi-bin/crtx_auth?key=${key}&wx=1`, status: 2 })
    setTimeout(() => {
      this.emit('scan', { status: 3 })
      this.emit('verify-code', { id: key, scene: 1, status: 1, message: '请输入企业微信手机端展示的验证码，以继续登录' })
    }, 300)
  }

  async enterVerifyCode (id, code) {
    say({ ev: 'enterVerifyCode', id, code })
    if (id !== this.key) throw new Error('Invalid verify code!')
    if (code !== CODE) {
      this.wrong++
      if (this.wrong >= 3) {
        setTimeout(() => this.showQr(KEYS[(KEYS.indexOf(this.key) + 1) % 2]), 100)
        throw new Error('验证码错误次数超过阈值，请重新扫码')
      }
      throw new Error('Invalid verify code!')
    }
    setTimeout(() => {
      this.login(SELF)
      setTimeout(() => this.emit('ready', { data: 'data ready' }), 100)
    }, 50)
  }

  async logout (reason) {
    await super.logout(reason)
    setTimeout(() => this.showQr(KEYS[(KEYS.indexOf(this.key) + 1) % 2]), 300)
  }

  async refreshQRCode () { this.showQr(this.key) }
  ding (data) { setTimeout(() => this.emit('dong', { data }), 10) }

  async contactList () {
    const ids = [SELF]
    for (let i = 0; i < N; i++) ids.push(`c${String(i).padStart(4, '0')}`)
    return ids
  }

  async contactRawPayload (id) {
    if (id === SELF) return { id, name: '客服小王', coworker: true }
    if (!/^c\d{4}$/.test(id) || Number(id.slice(1)) >= N) throw new Error(`contact ${id} not found`)
    return {
      id,
      name: `客户${id}`,
      phone: ['13800000000'],
      tags: Object.keys(this.tags).filter(t => this.tags[t].includes(id)),
      additionalInfo: JSON.stringify({ addContactTime: 1700000000000, corpId: 'ww123' }),
    }
  }

  async contactRawPayloadParser (raw) { return { avatar: '', gender: 1, type: 1, friend: true, ...raw } }

  sent (record) {
    const id = `m${++this.count}`
    say({ ev: 'send', id, ...record })
    return id
  }

  async messageSendText (conversationId, text) {
    await this.contactRawPayload(conversationId)
    const id = this.sent({ kind: 'text', conversationId, text })
    this.msgs[id] = { id, talkerId: SELF, listenerId: conversationId, text, type: 7, timestamp: Date.now() }
    setTimeout(() => this.emit('message', { messageId: id }), 20)
    if (text === 'ECHO') {
      const answer = `r${id}`
      this.msgs[answer] = { id: answer, talkerId: conversationId, listenerId: SELF, text: '价格多少', type: 7, timestamp: Date.now() }
      setTimeout(() => this.emit('message', { messageId: answer }), 50)
    }
    return id
  }

  async messageSendFile (conversationId, fileBox) {
    const data = await fileBox.toBuffer()
    return this.sent({ kind: 'file', conversationId, name: fileBox.name, size: data.length, boxType: fileBox.type })
  }

  async messageSendUrl (conversationId, payload) { return this.sent({ kind: 'url', conversationId, payload }) }
  async messageSendMiniProgram (conversationId, payload) { return this.sent({ kind: 'mini', conversationId, payload }) }

  async messageRawPayload (id) {
    if (!this.msgs[id]) throw new Error(`no message ${id}`)
    return this.msgs[id]
  }

  async messageRawPayloadParser (raw) { return raw }

  async tagTagList () { return Object.keys(this.tags) }
  async tagPayloadPuppet (id) {
    if (!this.tags[id]) throw new Error(`no tag ${id}`)
    return { id, name: 'VIP', type: 2, groupId: 'g1' }
  }

  async tagGroupPayloadPuppet (id) { return { id, name: '客户等级', type: 2 } }
  async tagGroupList () { return ['g1'] }

  async tagContactTagAdd (tagIds, contactIds) {
    say({ ev: 'tagAdd', tagIds, contactIds })
    for (const t of tagIds) {
      this.tags[t] = this.tags[t] || []
      for (const c of contactIds) if (!this.tags[t].includes(c)) this.tags[t].push(c)
    }
    for (const c of contactIds) this.emit('dirty', { payloadType: PUPPET.types.Dirty.Contact, payloadId: c })
  }

  async tagContactTagRemove (tagIds, contactIds) {
    say({ ev: 'tagRemove', tagIds, contactIds })
    for (const t of tagIds) this.tags[t] = (this.tags[t] || []).filter(c => !contactIds.includes(c))
  }
}

const server = new PuppetServer({
  endpoint: `127.0.0.1:${port}`,
  puppet: new WorkproLike(),
  token,
  tls: { disable: tlsArg !== 'tls' }, // with TLS: juzi's built-in certificate, for the name 'insecure'
})
await server.start()
say({ ev: 'listening', port: Number(port), tls: tlsArg === 'tls' })
process.on('SIGTERM', async () => { await server.stop(); process.exit(0) })
