//! SE blocks in a network: the crate's SE kernels (`se::cuda`) on pooled buffers, with bound
//! or host weights.

use super::*;

impl<A: NnAct> Cuda<A> {
    /// SE weights in pooled buffers (give them back with [`Cuda::give_back`]).
    pub(super) fn se_weights(&self, w: &SeWeights) -> Result<DeviceSeWeights> {
        let opt = |b: Option<&Vec<f32>>| b.map(|b| self.take_raw(b.len())).transpose();
        let bufs = [
            Some(self.take_raw(w.w1.len())?),
            opt(w.b1.as_ref())?,
            Some(self.take_raw(w.w2.len())?),
            opt(w.b2.as_ref())?,
        ];
        DeviceSeWeights::write_into(&self.dev, w, bufs)
    }

    /// The SE op's forward with its weights in `dw` (pooled buffers, given back after).
    pub(super) fn se_fwd_with(
        &self,
        dw: DeviceSeWeights,
        x: &GpuTensor<A>,
        residual: Option<&GpuTensor<A>>,
    ) -> Result<(GpuTensor<A>, CudaSeSaved)> {
        let config = dw.config();
        let mut y = self.out_t(x.shape())?;
        let (n, c, d) = (x.shape().n, config.channels, config.hidden);
        let bufs = [
            self.take_raw(n * c)?,
            self.take_raw(n * d)?,
            self.take_raw(n * d)?,
            self.take_raw(n * c)?,
        ];
        let mut sv = DeviceSeSaved::from_bufs(config, n, bufs)?;
        if self.poison {
            sv.poison_all(&self.dev)?;
        }
        se_gpu::forward_into(
            &self.dev,
            &dw,
            x.device_tensor(),
            residual.map(|r| r.device_tensor()),
            y.tensor_mut(),
            &mut sv,
            Default::default(),
        )?;
        self.give_back(dw.into_bufs());
        let saved = PooledSeSaved {
            saved: Some(sv),
            pool: self.pool.clone(),
        };
        Ok((GpuTensor::wrap(y), CudaSeSaved(Arc::new(saved))))
    }

    /// The SE op's backward with its weights in `dw` (given back after): `dx`, the parameter
    /// gradients in pooled buffers (the caller gives them back), `d residual`.
    pub(super) fn se_bwd_with(
        &self,
        dw: DeviceSeWeights,
        x: &GpuTensor<A>,
        residual: Option<&GpuTensor<A>>,
        saved: &CudaSeSaved,
        dy: &GpuTensor<A>,
    ) -> Result<(GpuTensor<A>, DeviceSeGrads, Option<GpuTensor<A>>)> {
        let config = dw.config();
        let mut dx = self.out_t(x.shape())?;
        let mut dres = residual.map(|r| self.out_t(r.shape())).transpose()?;
        let (c, d, bias) = (config.channels, config.hidden, config.bias);
        let opt = |n: usize| bias.then(|| self.take_raw(n)).transpose();
        let bufs = [
            Some(self.take_raw(d * c)?),
            opt(d)?,
            Some(self.take_raw(c * d)?),
            opt(c)?,
        ];
        let mut grads = DeviceSeGrads::from_bufs(config, bufs)?;
        if self.poison {
            grads.poison_all(&self.dev)?;
        }
        se_gpu::backward_into(
            &self.dev,
            &dw,
            x.device_tensor(),
            residual.map(|r| r.device_tensor()),
            saved.0.get(),
            dy.device_tensor(),
            dx.tensor_mut(),
            false,
            &mut grads,
            dres.as_mut().map(|d| d.tensor_mut()),
            Default::default(),
        )?;
        self.give_back(dw.into_bufs());
        Ok((GpuTensor::wrap(dx), grads, dres.map(GpuTensor::wrap)))
    }

    /// SE weights copied (on the device) from parameters bound here into pooled buffers;
    /// `None` when none of them is bound, an error when only some are.
    pub(super) fn se_bound_weights(
        &self,
        config: SeConfig,
        p: &SeLayerParams<'_, f32>,
    ) -> Result<Option<DeviceSeWeights>> {
        let all = [
            Some(p.fc1_weight),
            p.fc1_bias,
            Some(p.fc2_weight),
            p.fc2_bias,
        ];
        let mut stores = Vec::new();
        for q in all.iter().flatten() {
            stores.push(self.bound(q)?);
        }
        if stores.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut bufs: [Option<Buf<f32>>; 4] = [None, None, None, None];
        let mut it = stores.into_iter();
        for (slot, q) in bufs.iter_mut().zip(all) {
            if q.is_none() {
                continue;
            }
            let Some(Some(c)) = it.next() else {
                return Err(Error::Config("SE parameters are partly bound".into()));
            };
            let mut b = self.take_raw::<f32>(c.len)?;
            self.dev.copy(&c.value, 0, &mut b, 0, c.len)?;
            *slot = Some(b);
        }
        DeviceSeWeights::from_bufs(config, bufs).map(Some)
    }
}
